"""The Ruby buildpack in the slugbuilder and slugrunner images: the Sinatra example builds from
Debian's gems and serves, vendored gems install offline and are cached, and what cannot be
installed (a Ruby or gems the stack lacks) is warned about or refused with the gems listed."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from stackbuild import EXAMPLES, App, Stacks, chown_tree, get

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
def greeting_gem(stacks: Stacks, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """greeting-1.0.0.gem, built by the stack's `gem build` (a gem no registry has)."""
    src = tmp_path_factory.mktemp("greeting")
    (src / "lib").mkdir()
    (src / "lib" / "greeting.rb").write_text('module Greeting\n  TEXT = "Ruby vendored gem"\nend\n')
    (src / "greeting.gemspec").write_text(GREETING_SPEC)
    chown_tree(src)
    result = stacks.builder.run(
        ["gem", "build", "greeting.gemspec"], binds={src: "/src"}, cwd="/src"
    )
    assert result.returncode == 0, result.stdout
    return src / "greeting-1.0.0.gem"


def sinatra_app(stacks: Stacks, tmp_path: Path) -> App:
    return App.from_example(stacks, "ruby", "ruby-sinatra", tmp_path)


def test_example_builds_and_serves(stacks: Stacks, tmp_path: Path) -> None:
    app = sinatra_app(stacks, tmp_path)
    assert app.detect().output.strip() == "Ruby"
    result = app.compile(check=True)
    first = result.seconds
    assert "Using sinatra 3.0.5" in result.output and " !" not in result.output
    app.push(EXAMPLES / "ruby-sinatra")
    second = app.compile(check=True).seconds
    print(f"ruby example: first compile {first:.1f}s, second {second:.1f}s")
    assert app.release()["web"].startswith("bundle exec puma -p ${PORT:-5000}")
    with app.serving(next(PORTS)) as url:
        status, body = get(url)
    assert status == 200 and "Hello from Ruby 3.1" in body and "Sinatra" in body


def test_detect_refuses_an_app_without_a_gemfile(stacks: Stacks, tmp_path: Path) -> None:
    app = App.from_example(stacks, "ruby", "go", tmp_path)
    result = app.detect()
    assert result.returncode == 1 and result.output == ""


def test_vendored_gem_installs_offline_and_is_cached(
    stacks: Stacks, tmp_path: Path, greeting_gem: Path
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
    app = App.from_dir(stacks, "ruby", src, tmp_path)
    result = app.compile(check=True)
    first = result.seconds
    assert "Installing greeting 1.0.0" in result.output
    assert "Using cached gems" not in result.output
    app.push(src)
    result = app.compile(check=True)
    second = result.seconds
    assert "Using cached gems from the previous build (1 gems)" in result.output
    assert "Using greeting 1.0.0" in result.output
    print(f"ruby vendored gem: first compile {first:.1f}s, cached {second:.1f}s")
    assert app.release()["web"].startswith("bundle exec rackup config.ru")
    with app.serving(next(PORTS)) as url:
        assert get(url) == (200, "Ruby vendored gem")


def test_other_ruby_version_warns_and_builds_with_3_1(stacks: Stacks, tmp_path: Path) -> None:
    app = sinatra_app(stacks, tmp_path)
    gemfile = (EXAMPLES / "ruby-sinatra" / "Gemfile").read_text()
    app.write("Gemfile", gemfile.replace("\ngem ", '\nruby "3.2.2"\ngem ', 1))
    result = app.compile(check=True)
    assert " !     The Gemfile asks for Ruby 3.2.2; the stack has Ruby 3.1.2" in result.output
    assert (
        "# (ruby directive disabled by Flynn's Ruby buildpack) ruby"
        in (app.app / "Gemfile").read_text()
    )
    with app.serving(next(PORTS)) as url:
        assert get(url)[0] == 200


def test_lockfile_pinning_other_versions_is_resolved_again(stacks: Stacks, tmp_path: Path) -> None:
    app = sinatra_app(stacks, tmp_path)
    lock = (app.app / "Gemfile.lock").read_text()
    app.write("Gemfile.lock", lock.replace("sinatra (3.0.5)", "sinatra (3.1.0)"))
    result = app.compile(check=True)
    assert "Gemfile.lock pins gem versions that are neither in vendor/cache nor" in result.output
    assert " !       < sinatra (3.1.0)\n !       > sinatra (3.0.5)" in result.output
    assert "sinatra (3.0.5)" in (app.app / "Gemfile.lock").read_text()


def test_lockfile_that_cannot_be_resolved_again_fails(stacks: Stacks, tmp_path: Path) -> None:
    app = sinatra_app(stacks, tmp_path)
    gemfile = (EXAMPLES / "ruby-sinatra" / "Gemfile").read_text()
    app.write("Gemfile", gemfile + 'group :test do\n  gem "rspec", "~> 3.12"\nend\n')
    lock = (app.app / "Gemfile.lock").read_text()
    lock = lock.replace("    rack (2.2.22)\n", "    rack (2.2.22)\n    rspec (3.12.0)\n")
    lock = lock.replace("  puma\n", "  puma\n  rspec (~> 3.12)\n")
    app.write("Gemfile.lock", lock.replace("sinatra (3.0.5)", "sinatra (3.1.0)"))
    result = app.compile()
    assert result.returncode != 0
    assert "these are missing:\n !       rspec (~> 3.12)" in result.output
    assert "rubygems.org is not reachable" in result.output
    assert "sinatra (3.1.0)" in (app.app / "Gemfile.lock").read_text()


def test_gems_the_stack_lacks_are_listed(stacks: Stacks, tmp_path: Path) -> None:
    app = sinatra_app(stacks, tmp_path)
    gemfile = (EXAMPLES / "ruby-sinatra" / "Gemfile").read_text()
    app.write("Gemfile", gemfile + 'gem "rails", "~> 7.0"\ngem "nokogiri"\n')
    result = app.compile()
    assert result.returncode != 0
    assert (
        " !     These gems are neither in vendor/cache nor installed in the stack:\n"
        " !       rails (~> 7.0)\n"
        " !       nokogiri (>= 0)\n"
        " !     rubygems.org is not reachable from this cluster. Run `bundle package`"
    ) in result.output
    assert "sinatra 3.0.5" in result.output
