from pyrolora.cli import app

app()
