"""The applications over the engine library: the `ddpm-engine` command line (cli.py), the HTTP server
(serve.py and its page), the benchmark command (bench.py), and what the three command lines share
(clitools.py). Nothing in the library imports these (tests/test_imports.py)."""
