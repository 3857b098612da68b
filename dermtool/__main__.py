from dermtool.cli import app

app(prog_name="dermtool")
