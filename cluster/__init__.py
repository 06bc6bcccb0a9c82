"""Config schema, app builder, command line and deployment files."""
