"""The version of vtr (``vtr.__version__``), in a module of its own so that any layer (the CLI's
``--version``) can read it without importing the facade."""
__version__ = "0.1.0"
