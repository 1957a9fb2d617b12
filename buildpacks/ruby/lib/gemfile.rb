# What bin/compile needs to know about the app's Gemfile before bundler runs, read with
# bundler's own DSL (offline; nothing is resolved):
#
#   ruby gemfile.rb ruby-line   "<line> <requirement>" of a `ruby` directive the stack's Ruby
#                               does not satisfy (nothing if there is none or it is satisfied)
#   ruby gemfile.rb missing     one line per Gemfile dependency that no installed gem
#                               (GEM_PATH: the stack's Debian gems, the app's GEM_HOME) and no
#                               gem in vendor/cache satisfies: "<group state>\t<gem> (<req>)"
#                               where the state is "needed" or "excluded" (a BUNDLE_WITHOUT group)
require "bundler"
require "rubygems/package"

gemfile = File.expand_path(ENV.fetch("BUNDLE_GEMFILE", "Gemfile"))
ruby_calls = []
dsl = Bundler::Dsl.new
# the stack has one Ruby: record the directive instead of letting bundler refuse it
dsl.define_singleton_method(:ruby) do |*versions, **options|
  site = caller_locations.find { |loc| File.expand_path(loc.path) == gemfile }
  ruby_calls << [site ? site.lineno : 0, versions, options]
end
dsl.eval_gemfile(gemfile)

case ARGV[0]
when "ruby-line"
  ruby_calls.each do |line, versions, options|
    wanted = versions.empty? ? options.inspect : versions.join(", ")
    satisfied = !versions.empty? && options.empty? &&
                Gem::Requirement.create(versions).satisfied_by?(Gem::Version.new(RUBY_VERSION))
    puts "#{line} #{wanted}" unless satisfied
  end
when "missing"
  without = (ENV["BUNDLE_WITHOUT"] || "").split(/[:\s,]+/).reject(&:empty?).map(&:to_sym)
  cache = File.join(File.dirname(gemfile), "vendor", "cache")
  cached = Dir[File.join(cache, "*.gem")].filter_map do |path|
    Gem::Package.new(path).spec
  rescue StandardError
    nil
  end
  dsl.dependencies.each do |dep|
    next unless dep.should_include?
    source = dep.source
    next if source.is_a?(Bundler::Source::Path) && !source.is_a?(Bundler::Source::Git)
    if source.is_a?(Bundler::Source::Git)
      found = !Dir[File.join(cache, "#{dep.name}-*")].select { |p| File.directory?(p) }.empty?
      label = "#{dep.name} (git: #{source.uri})"
    else
      found = !Gem::Specification.find_all_by_name(dep.name, dep.requirement).empty? ||
              cached.any? { |spec| dep.matches_spec?(spec) }
      label = "#{dep.name} (#{dep.requirement})"
    end
    next if found
    state = (dep.groups - without).empty? ? "excluded" : "needed"
    puts "#{state}\t#{label}"
  end
else
  abort "usage: gemfile.rb ruby-line|missing"
end
