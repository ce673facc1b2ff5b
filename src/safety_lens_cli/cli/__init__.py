"""Typer and Rich front end. The core modules never import from here."""
