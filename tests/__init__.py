"""The test suite (a package: conftest and its helpers import under one name, tests.conftest)."""
