<?php
// A tiny app for Flynn's PHP buildpack: nginx and php-fpm serve it on $PORT.
header('Content-Type: text/plain');
printf("Hello from PHP %s on Flynn, port %s\n", PHP_VERSION, $_ENV['PORT'] ?? getenv('PORT'));
