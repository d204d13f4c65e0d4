from cl.cli import entry

entry()
