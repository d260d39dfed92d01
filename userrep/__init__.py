"""userrep: generalized user representations for transfer learning."""
