"""Feast definitions for userrep (declarative only: `feast apply` imports every .py file here)."""
