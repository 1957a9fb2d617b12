# A tiny Sinatra app (modular style) for Flynn's Ruby buildpack.
require "sinatra/base"

class Hello < Sinatra::Base
  get "/" do
    content_type "text/plain"
    "Hello from Ruby #{RUBY_VERSION} and Sinatra #{Sinatra::VERSION} on Flynn\n"
  end
end
