"""The router: Flynn's front door (HTTP, HTTPS with SNI, TCP routes), routes from the
controller and backends from discoverd. See docs/router.md."""
