from mlserve.main import cli

cli()
