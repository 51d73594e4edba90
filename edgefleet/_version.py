# The one place the version is written; hatch reads it for the package metadata.
__version__ = "0.1.0"
