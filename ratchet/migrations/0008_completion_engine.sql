-- Which engine replica answered: with several replicas, provenance includes the server.
ALTER TABLE completions ADD COLUMN engine_url text;
