"""The controller's schema as numbered SQL files (`NNNN_name.sql`), applied in order by
`flynn_controller.db.migrate`. A change to the schema is a new file, never an edit."""
