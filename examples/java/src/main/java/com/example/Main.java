package com.example;

import java.io.IOException;
import javax.servlet.http.HttpServletRequest;
import javax.servlet.http.HttpServletResponse;
import org.eclipse.jetty.server.Request;
import org.eclipse.jetty.server.Server;
import org.eclipse.jetty.server.handler.AbstractHandler;

/** A tiny web app: embedded Jetty 9 answering every request with a line of text. */
public class Main extends AbstractHandler {
    @Override
    public void handle(String target, Request base, HttpServletRequest request,
                       HttpServletResponse response) throws IOException {
        response.setContentType("text/plain; charset=utf-8");
        response.setStatus(HttpServletResponse.SC_OK);
        response.getWriter().println("Hello from Java " + System.getProperty("java.version")
                + " on Flynn (embedded Jetty " + Server.getVersion() + ")");
        base.setHandled(true);
    }

    public static void main(String[] args) throws Exception {
        int port = Integer.parseInt(System.getenv().getOrDefault("PORT", "8080"));
        Server server = new Server(port);
        server.setHandler(new Main());
        server.start();
        server.join();
    }
}
