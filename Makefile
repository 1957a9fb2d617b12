# flynn-host: developer entry points. Every target that needs the environment runs `dev` first,
# which installs what a fresh Debian 12 machine lacks (apt packages, the virtualenv, test image).

PYTHON ?= /usr/bin/python3
VENV   ?= .venv
BIN    := $(VENV)/bin
IMAGES ?= /var/lib/flynn/images
APT_LOG ?= /tmp/flynn-make-apt.log
APT_PACKAGES := runc squashfs-tools busybox-static tini iproute2 iptables util-linux \
                e2fsprogs python3-venv python3-dev procps curl binutils strace mmdebstrap \
                etcd-server etcd-client dnsutils nftables \
                postgresql-15 patroni postgresql-15-postgis-3 postgresql-15-postgis-3-scripts \
                postgresql-15-pgrouting postgresql-15-pgrouting-scripts postgresql-15-pgextwlist \
                nginx-light wrk

.PHONY: dev apt venv images demo test test-slow bench lint format clean dist

dev: apt venv images

apt:
	@missing=""; for p in $(APT_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "apt: installing$$missing (log: $(APT_LOG))"; \
	  had_main=$$(test -d /etc/postgresql/15/main && echo yes); \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; } \
	    >$(APT_LOG) 2>&1 || { tail -20 $(APT_LOG); exit 1; }; \
	  if [ -z "$$had_main" ] && [ -d /etc/postgresql/15/main ]; then \
	    echo "apt: removing the PostgreSQL cluster 15/main the package made (nodes run in jobs)"; \
	    pg_dropcluster --stop 15 main >>$(APT_LOG) 2>&1; \
	  fi; \
	  if echo "$$missing" | grep -q nginx-light; then \
	    echo "apt: stopping the nginx the package started (the router bench runs its own)"; \
	    { systemctl disable --now nginx || service nginx stop || true; } >>$(APT_LOG) 2>&1; \
	  fi; \
	fi

venv: $(BIN)/flynn-host

$(BIN)/flynn-host: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	@touch $@

# busybox (tests) and the Debian images base, components, stack (packaging/images/): built once
# per machine into $(IMAGES) (about 4 minutes), then reused until a recipe changes
images: venv
	@$(BIN)/python -m flynn_host.dev.busybox --dir $(IMAGES) >/dev/null
	$(BIN)/python packaging/images/build.py --out $(IMAGES)

demo: dev
	FLYNN_IMAGES=$(IMAGES) $(BIN)/python script/demo.py

# -rfEs: the summary lists failures, errors and every skip with its reason (a run as root
# should skip nothing that `make dev` installs)
test: dev
	FLYNN_IMAGES=$(IMAGES) $(BIN)/python -m pytest -q -rfEs

test-slow: dev
	FLYNN_IMAGES=$(IMAGES) $(BIN)/python -m pytest -q -rfEs -m slow

bench: dev
	FLYNN_IMAGES=$(IMAGES) $(BIN)/python bench/job_start.py
	$(BIN)/python bench/discoverd.py
	$(BIN)/python bench/discoverd_failover.py
	FLYNN_IMAGES=$(IMAGES) $(BIN)/python bench/overlay.py
	FLYNN_IMAGES=$(IMAGES) $(BIN)/python bench/postgres_failover.py
	$(BIN)/python bench/controller.py
	$(BIN)/python bench/router.py
	FLYNN_IMAGES=$(IMAGES) $(BIN)/python bench/build.py

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: venv
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# the frozen flynn-host: a PyInstaller one-directory bundle in dist/flynn-host/ (packaging/)
dist: apt venv
	$(BIN)/pyinstaller --noconfirm --log-level WARN --distpath dist --workpath build \
	  packaging/flynn-host.spec

clean:
	rm -rf $(VENV) var build dist *.egg-info
