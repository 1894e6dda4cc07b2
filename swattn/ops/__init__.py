"""The sliding-window attention op: public entry point, oracle and backends."""
