"""The only package that reaches Ray's private modules (warm spares, the drain flag, the shutdown
callback): a Ray upgrade breaks here or nowhere."""
