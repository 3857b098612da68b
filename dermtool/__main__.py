from dermtool.cli import entry

entry()
