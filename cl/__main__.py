from cl.cli.main import entry

entry()
