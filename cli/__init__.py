"""The `compaction` command (cli.main) and `compaction demo` (cli.demo): the entry points, above
every layer (they start flows), so that the library below never imports flows or tasks."""
