"""KFP components (thin shells over the userrep core)."""
