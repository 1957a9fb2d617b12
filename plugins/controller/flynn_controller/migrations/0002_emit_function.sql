-- Writing an event in one round trip: take the event lock (ids become visible in id order,
-- see flynn_controller/events.py), insert the row, notify the listeners. The lock is held from
-- here to the commit, so the fewer round trips after it the more writers get through.
CREATE FUNCTION flynn_emit_event(
    lock_key bigint, p_app_id uuid, p_object_type text, p_object_id text, p_unique_id text,
    p_data jsonb
) RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    new_id bigint;
BEGIN
    PERFORM pg_advisory_xact_lock(lock_key);
    INSERT INTO events (app_id, object_type, object_id, unique_id, data)
        VALUES (p_app_id, p_object_type, p_object_id, p_unique_id, p_data)
        ON CONFLICT (unique_id) DO NOTHING
        RETURNING event_id INTO new_id;
    IF new_id IS NOT NULL THEN
        PERFORM pg_notify('flynn_controller_events', new_id::text);
    END IF;
    RETURN new_id;
END
$$;
