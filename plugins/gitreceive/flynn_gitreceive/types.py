"""What gitreceive and the receiver agree on."""

from __future__ import annotations

import re

# an app name as Flynn's gitreceive accepts it in a repository path
APP_NAME_RE = re.compile(r"^[a-z\d]+(-[a-z\d]+)*$")
# the only branch a push to which builds and deploys
DEPLOY_REF = "refs/heads/master"
ZERO_SHA = "0" * 40
BLOBSTORE_URL = "http://blobstore.discoverd"
# where things live in the blobstore
REPO_PATH = "/repos/{app_id}.tar"
CACHE_PATH = "/{app_id}-cache.tgz"
SLUG_LAYERS_PATH = "/slugs/layers/"
SLUG_IMAGES_PATH = "/slugs/images/{image_id}.json"
