"""The package version (its own module so that modules inside the package can read it without importing upward)."""

__version__ = "0.2.0"
