"""KFP pipelines: wiring only (the steps live in components/, the logic in userrep/)."""
