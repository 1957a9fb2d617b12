"""The Ruby buildpack in the stack image: the Sinatra example builds from Debian's gems and
serves, vendored gems install offline and are cached, and what cannot be installed (a Ruby or
gems the stack lacks) is warned about or refused with the gems listed."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from slugbuild import EXAMPLES, BuiltApp, chown_tree, http_get

from flynn_host.dev.stackroot import StackRoot

pytestmark = pytest.mark.needs("unshare", "mount", "chroot", "setpriv")

PORTS = iter(range(16120, 16140))

GREETING_SPEC = """Gem::Specification.new do |s|
  s.name = "greeting"
  s.version = "1.0.0"
  s.summary = "a gem only this test has"
  s.authors = ["Flynn"]
  s.files = ["lib/greeting.rb"]
end
"""


@pytest.fixture(scope="module")
def root() -> Iterator[StackRoot]:
    with StackRoot() as stack:
        yield stack


@pytest.fixture(scope="module")
def greeting_gem(root: StackRoot, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """greeting-1.0.0.gem, built by the stack's `gem build` (a gem no registry has)."""
    src = tmp_path_factory.mktemp("greeting")
    (src / "lib").mkdir()
    (src / "lib" / "greeting.rb").write_text('module Greeting\n  TEXT = "Ruby vendored gem"\nend\n')
    (src / "greeting.gemspec").write_text(GREETING_SPEC)
    chown_tree(src)
    result = root.run(["gem", "build", "greeting.gemspec"], binds={src: "/src"}, cwd="/src")
    assert result.returncode == 0, result.stdout
    return src / "greeting-1.0.0.gem"


def sinatra_app(root: StackRoot, tmp_path: Path) -> BuiltApp:
    return BuiltApp.from_example(root, "ruby", "ruby-sinatra", tmp_path)


def test_example_builds_and_serves(root: StackRoot, tmp_path: Path) -> None:
    app = sinatra_app(root, tmp_path)
    assert app.detect().stdout.strip() == "Ruby"
    first, result = app.timed_compile()
    assert "Using sinatra 3.0.5" in result.stdout and " !" not in result.stdout
    app.push(EXAMPLES / "ruby-sinatra")
    second, _ = app.timed_compile()
    print(f"ruby example: first compile {first:.1f}s, second {second:.1f}s")
    assert app.release()["web"].startswith("bundle exec puma -p ${PORT:-5000}")
    with app.serving(next(PORTS)) as url:
        status, body = http_get(url)
    assert status == 200 and "Hello from Ruby 3.1" in body and "Sinatra" in body


def test_detect_refuses_an_app_without_a_gemfile(root: StackRoot, tmp_path: Path) -> None:
    app = BuiltApp.from_example(root, "ruby", "go", tmp_path)
    result = app.detect()
    assert result.returncode == 1 and result.stdout == ""


def test_vendored_gem_installs_offline_and_is_cached(
    root: StackRoot, tmp_path: Path, greeting_gem: Path
) -> None:
    src = tmp_path / "src"
    (src / "vendor" / "cache").mkdir(parents=True)
    shutil.copy(greeting_gem, src / "vendor" / "cache")
    (src / "Gemfile").write_text(
        'source "https://rubygems.org"\ngem "rack"\ngem "webrick"\ngem "greeting"\n'
    )
    (src / "config.ru").write_text(
        'require "greeting"\n'
        'run ->(env) { [200, {"content-type" => "text/plain"}, [Greeting::TEXT]] }\n'
    )
    app = BuiltApp.from_dir(root, "ruby", src, tmp_path)
    first, result = app.timed_compile()
    assert "Installing greeting 1.0.0" in result.stdout
    assert "Using cached gems" not in result.stdout
    app.push(src)
    second, result = app.timed_compile()
    assert "Using cached gems from the previous build (1 gems)" in result.stdout
    assert "Using greeting 1.0.0" in result.stdout
    print(f"ruby vendored gem: first compile {first:.1f}s, cached {second:.1f}s")
    assert app.release()["web"].startswith("bundle exec rackup config.ru")
    with app.serving(next(PORTS)) as url:
        assert http_get(url) == (200, "Ruby vendored gem")


def test_other_ruby_version_warns_and_builds_with_3_1(root: StackRoot, tmp_path: Path) -> None:
    app = sinatra_app(root, tmp_path)
    gemfile = (EXAMPLES / "ruby-sinatra" / "Gemfile").read_text()
    app.write("Gemfile", gemfile.replace("\ngem ", '\nruby "3.2.2"\ngem ', 1))
    result = app.compile(check=True)
    assert " !     The Gemfile asks for Ruby 3.2.2; the stack has Ruby 3.1.2" in result.stdout
    assert (
        "# (ruby directive disabled by Flynn's Ruby buildpack) ruby"
        in (app.app / "Gemfile").read_text()
    )
    with app.serving(next(PORTS)) as url:
        assert http_get(url)[0] == 200


def test_lockfile_pinning_other_versions_is_resolved_again(root: StackRoot, tmp_path: Path) -> None:
    app = sinatra_app(root, tmp_path)
    lock = (app.app / "Gemfile.lock").read_text()
    app.write("Gemfile.lock", lock.replace("sinatra (3.0.5)", "sinatra (3.1.0)"))
    result = app.compile(check=True)
    assert "Gemfile.lock pins gem versions that are neither in vendor/cache nor" in result.stdout
    assert " !       < sinatra (3.1.0)\n !       > sinatra (3.0.5)" in result.stdout
    assert "sinatra (3.0.5)" in (app.app / "Gemfile.lock").read_text()


def test_lockfile_that_cannot_be_resolved_again_fails(root: StackRoot, tmp_path: Path) -> None:
    app = sinatra_app(root, tmp_path)
    gemfile = (EXAMPLES / "ruby-sinatra" / "Gemfile").read_text()
    app.write("Gemfile", gemfile + 'group :test do\n  gem "rspec", "~> 3.12"\nend\n')
    lock = (app.app / "Gemfile.lock").read_text()
    lock = lock.replace("    rack (2.2.22)\n", "    rack (2.2.22)\n    rspec (3.12.0)\n")
    lock = lock.replace("  puma\n", "  puma\n  rspec (~> 3.12)\n")
    app.write("Gemfile.lock", lock.replace("sinatra (3.0.5)", "sinatra (3.1.0)"))
    result = app.compile()
    assert result.returncode != 0
    assert "these are missing:\n !       rspec (~> 3.12)" in result.stdout
    assert "rubygems.org is not reachable" in result.stdout
    assert "sinatra (3.1.0)" in (app.app / "Gemfile.lock").read_text()


def test_gems_the_stack_lacks_are_listed(root: StackRoot, tmp_path: Path) -> None:
    app = sinatra_app(root, tmp_path)
    gemfile = (EXAMPLES / "ruby-sinatra" / "Gemfile").read_text()
    app.write("Gemfile", gemfile + 'gem "rails", "~> 7.0"\ngem "nokogiri"\n')
    result = app.compile()
    assert result.returncode != 0
    assert (
        " !     These gems are neither in vendor/cache nor installed in the stack:\n"
        " !       rails (~> 7.0)\n"
        " !       nokogiri (>= 0)\n"
        " !     rubygems.org is not reachable from this cluster. Run `bundle package`"
    ) in result.stdout
    assert "sinatra 3.0.5" in result.stdout
