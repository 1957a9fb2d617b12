// Reads what the buildpack needs from package.json and package-lock.json, with the stack's
// Node.js and its Debian modules (semver, npm-package-arg), so compile and release stay bash.
//   pkg.js DIR check               exits 1 (saying why) unless package.json is valid JSON
//   pkg.js DIR get engines.node    a string field, or nothing
//   pkg.js DIR script NAME         exits 0 if scripts.NAME is set
//   pkg.js DIR outside-registry    one line per dependency that is not on the npm registry
//   pkg.js DIR satisfies V RANGE   exits 0 if version V is in RANGE
//   pkg.js DIR max-satisfying R    the highest version in RANGE R among a JSON list (stdin)
"use strict";
module.paths.push("/usr/share/nodejs");
const fs = require("fs");
const path = require("path");
const semver = require("semver");
const npa = require("npm-package-arg");

const [dir, command, ...args] = process.argv.slice(2);

function readJson(name) {
  return JSON.parse(fs.readFileSync(path.join(dir, name), "utf8"));
}

function pkg() {
  return readJson("package.json");
}

const REGISTRY = /^https:\/\/registry\.npmjs\.org\//;
const REGISTRY_TYPES = new Set(["version", "range", "tag", "alias"]);

function outsideRegistry() {
  const found = [];
  const p = pkg();
  for (const field of ["dependencies", "optionalDependencies", "devDependencies"]) {
    for (const [name, spec] of Object.entries(p[field] || {})) {
      let type;
      try {
        type = npa.resolve(name, String(spec), dir).type;
      } catch (err) {
        type = "unsupported";
      }
      if (!REGISTRY_TYPES.has(type) && type !== "file" && type !== "directory") {
        found.push(`${name}: ${spec} (${field})`);
      }
    }
  }
  for (const lock of ["npm-shrinkwrap.json", "package-lock.json"]) {
    if (!fs.existsSync(path.join(dir, lock))) continue;
    const packages = readJson(lock).packages || {};
    for (const [where, entry] of Object.entries(packages)) {
      const resolved = entry.resolved;
      if (resolved && !entry.link && !REGISTRY.test(resolved) && !resolved.startsWith("file:")) {
        found.push(`${where.replace(/^.*node_modules\//, "")}: ${resolved} (${lock})`);
      }
    }
    break;
  }
  return found;
}

switch (command) {
  case "check":
    try {
      pkg();
    } catch (err) {
      console.log(err.message);
      process.exit(1);
    }
    break;
  case "get": {
    let value = pkg();
    for (const key of args[0].split(".")) value = value && value[key];
    if (typeof value === "string") console.log(value);
    break;
  }
  case "script":
    process.exit((pkg().scripts || {})[args[0]] ? 0 : 1);
    break;
  case "outside-registry":
    for (const line of outsideRegistry()) console.log(line);
    break;
  case "satisfies":
    process.exit(semver.validRange(args[1]) && semver.satisfies(args[0], args[1]) ? 0 : 1);
    break;
  case "max-satisfying": {
    let versions = JSON.parse(fs.readFileSync(0, "utf8") || "[]");
    if (!Array.isArray(versions)) versions = [versions];
    const best = semver.maxSatisfying(versions, args[0]);
    if (best) console.log(best);
    break;
  }
  default:
    console.error(`pkg.js: unknown command ${command}`);
    process.exit(2);
}
