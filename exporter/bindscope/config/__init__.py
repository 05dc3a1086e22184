"""The YAML config: parsed into frozen records, with errors located at file:line:col;
its JSON Schema and the embedded default beside it."""
