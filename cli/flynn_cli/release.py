"""`flynn release` (list, show, add, rollback) and `flynn deployment`: an app's releases,
adding one from an image URI, deploying an earlier one again, and its deployments.

`rollback` is not in the 2015 CLI (Heroku users expect it): it deploys the release before the
current one (by `created_at`), or the one named, through the same deploy and wait as
`flynn env set`."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

from flynn_cli.context import Context
from flynn_cli.output import (
    CommandError,
    TabWriter,
    go_time_string,
    human_time,
    log,
    parse_time,
    sorted_items,
)

Args = dict[str, Any]

RELEASE_USAGE = """
usage: flynn release [-q|--quiet]
       flynn release add [-t <type>] [-f <file>] <uri>
       flynn release show [--json] [<id>]
       flynn release rollback [<id>]

Manage app releases.

Options:
	-q, --quiet        only print release IDs
	-t <type>          type of the release. Currently only 'docker' is supported. [default: docker]
	-f, --file=<file>  release configuration file
	--json             print release configuration in JSON format

Commands:
	With no arguments, shows a list of releases associated with the app.

	add	add a new release

		Create a new release from a Docker image.

		The optional file argument takes a path to a file containing release
		configuration in a JSON format. It's primarily used for specifying the
		release environment and processes (similar to a Procfile). It can take any
		of the arguments the controller Release type can take.

	show	show information about a release

		Omit the ID to show information about the current release.

	rollback	deploy an earlier release again

		Deploys the release created before the current one, or the release
		with the given ID, and waits for the deployment to finish.

Examples:

	Release an echo server using the flynn/slugbuilder image as a base, running socat.

	$ cat config.json
	{
		"env": {"MY_VAR": "Hello World, this will be available in all process types."},
		"processes": {
			"echo": {
				"cmd": ["socat -v tcp-l:$PORT,fork exec:/bin/cat"],
				"entrypoint": ["sh", "-c"],
				"env": {"ECHO": "This var is specific to the echo process type."},
				"ports": [{"proto": "tcp"}]
			}
		}
	}
	$ flynn release add -f config.json https://registry.hub.docker.com?name=flynn/slugbuilder&id=15d72b7f573b
	Created release 427537e78be4417fae2e24d11bc993eb.

	$ flynn release
	ID                                Created
	427537e78be4417fae2e24d11bc993eb  11 seconds ago

	$ flynn release show
	ID:             427537e78be4417fae2e24d11bc993eb
	Artifact:       docker+https://registry.hub.docker.com?name=flynn/slugbuilder&id=15d72b7f573b
	Process Types:  echo
	Created At:     2015-05-06 21:58:12.751741 +0000 UTC
	ENV[MY_VAR]:    Hello World, this will be available in all process types.

	$ flynn release rollback
	Rolled back to release 5058ae7964f74c399a240bdd6e7d1bcb.
"""

DEPLOYMENT_USAGE = """
usage: flynn deployment

List deployments for an app.

Examples:

	$ flynn deployment
	ID                                    STATUS    CREATED             FINISHED
	a6d470d6-9638-4d74-ae71-91c3d9887714  running   4 seconds ago
	39f8b98b-2aed-40a5-9423-ae174b3fb7a9  complete  16 seconds ago      14 seconds ago
"""

# the fields of Go's ct.Release, in its order (all omitempty)
RELEASE_FIELDS = ("id", "artifact", "env", "meta", "processes", "created_at")

ARTIFACT_TYPES = ("docker", "flynn")


def release_body(release: dict[str, Any]) -> dict[str, Any]:
    """A Release as Go's `ct.Release` marshals it: known fields only, empty ones left out."""
    return {k: release[k] for k in RELEASE_FIELDS if release.get(k)}


def go_json(value: Any) -> str:
    """Go's `json.Encoder` output: compact, with `<`, `>` and `&` escaped."""
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def run_release(args: Args, ctx: Context) -> None:
    if args["show"]:
        run_release_show(args, ctx)
    elif args["add"]:
        if args["-t"] not in ARTIFACT_TYPES:
            raise CommandError(f"Release type {args['-t']} not supported.")
        run_release_add(args, ctx)
    elif args["rollback"]:
        run_release_rollback(args, ctx)
    else:
        run_release_list(args, ctx)


def run_release_list(args: Args, ctx: Context) -> None:
    app = ctx.app()
    releases = ctx.client.app_release_list(app)
    if args["--quiet"]:
        for r in releases:
            print(r.get("id", ""))
        return
    with TabWriter() as w:
        w.row("ID", "Created")
        for r in releases:
            w.row(r.get("id", ""), human_time(r.get("created_at")))


def run_release_show(args: Args, ctx: Context) -> None:
    if args["<id>"]:
        release = ctx.client.get_release(args["<id>"])
    else:
        app = ctx.app()
        release = ctx.client.app_release(app)
    if args["--json"]:
        print(go_json(release_body(release)))
        return
    artifact_desc = ""
    if release.get("artifact"):
        artifact = ctx.client.get_artifact(release["artifact"])
        artifact_desc = f"{artifact.get('type', '')}+{artifact.get('uri', '')}"
    with TabWriter() as w:
        w.row("ID:", release.get("id", ""))
        w.row("Artifact:", artifact_desc)
        w.row("Process Types:", ", ".join(sorted(release.get("processes") or {})))
        w.row("Created At:", go_time_string(release.get("created_at")))
        for k, v in sorted_items(release.get("env")):
            w.row(f"ENV[{k}]", v)


def run_release_add(args: Args, ctx: Context) -> None:
    app = ctx.app()
    client = ctx.client
    release: dict[str, Any] = {}
    if args["--file"]:
        try:
            with open(args["--file"]) as f:
                data = json.load(f)
        except OSError as e:
            raise CommandError(f"open {args['--file']}: {e.strerror}") from None
        except ValueError as e:
            raise CommandError(f"invalid release file {args['--file']}: {e}") from None
        if not isinstance(data, dict):
            raise CommandError("json: cannot unmarshal into a release: not an object")
        release = data
    artifact = client.create_artifact({"type": args["-t"], "uri": args["<uri>"]})
    release["artifact"] = artifact["id"]
    created = client.create_release(release_body(release))
    client.deploy_app_release(app, created["id"])
    log(f"Created release {created['id']}.")


def run_release_rollback(args: Args, ctx: Context) -> None:
    app = ctx.app()
    client = ctx.client
    current_id = ctx.current_release_id(app)
    # newest first; the server's order, made sure of (a release without a time goes last)
    releases = sorted(
        client.app_release_list(app),
        key=lambda r: parse_time(r.get("created_at")) or dt.datetime.min.replace(tzinfo=dt.UTC),
        reverse=True,
    )
    ids = [r.get("id") for r in releases]
    target = args["<id>"]
    if target:
        if target not in ids:
            raise CommandError(f"release {target} is not a release of app {app}")
        if target == current_id:
            raise CommandError(f"release {target} is already the current release of {app}")
    else:
        if current_id is None:
            raise CommandError(f"app {app} has no current release to roll back from")
        later = ids.index(current_id) + 1 if current_id in ids else len(ids)
        if later >= len(ids):
            raise CommandError(f"no release before the current one ({current_id}) to roll back to")
        target = ids[later]
    client.deploy_app_release(app, target)
    log(f"Rolled back to release {target}.")


def run_deployment(args: Args, ctx: Context) -> None:
    app = ctx.app()
    deployments = ctx.client.deployment_list(app)
    with TabWriter() as w:
        w.row("ID", "STATUS", "CREATED", "FINISHED")
        for d in deployments:
            w.row(
                d.get("id", ""),
                d.get("status", ""),
                human_time(d.get("created_at")),
                human_time(d.get("finished_at")),
            )
