-- The hosts a formation's process types may run on, while a deployment replaces a stateful
-- or host-bound app host by host (`discoverd-meta`, `sirenia`): {"<type>": ["<host id>", ...]}.
-- NULL, or a type not named, means any host (the tags still apply).
ALTER TABLE formations ADD COLUMN hosts jsonb;
