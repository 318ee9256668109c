from batchscope.cli.main import run

run()
