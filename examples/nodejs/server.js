// Flynn's Node.js example: answers GET / on $PORT with the job that served it, and GET /db
// with a query of the app's PostgreSQL database (after `flynn resource add postgres`).
const express = require("express");
const { Client } = require("pg");

const app = express();
const port = process.env.PORT || 5000;
const job = process.env.FLYNN_JOB_ID || "local";

app.get("/", (req, res) => {
  console.log(`GET / answered by ${job}`);
  const greeting = process.env.GREETING || "Hello";
  res.type("text/plain").send(`${greeting} from Node.js ${process.version} on Flynn! (job ${job})\n`);
});

app.get("/db", async (req, res) => {
  if (!process.env.DATABASE_URL) {
    res.status(503).type("text/plain").send("no database: run `flynn resource add postgres`\n");
    return;
  }
  // the resource's PG* variables (PGHOST, PGUSER, PGPASSWORD, PGDATABASE) configure the client
  const db = new Client();
  try {
    await db.connect();
    await db.query("CREATE TABLE IF NOT EXISTS visits (at timestamptz NOT NULL DEFAULT now())");
    await db.query("INSERT INTO visits DEFAULT VALUES");
    const { rows } = await db.query("SELECT count(*) AS n, version() AS v FROM visits");
    console.log(`GET /db: visit ${rows[0].n}`);
    res.type("text/plain").send(`visits: ${rows[0].n} (${rows[0].v.split(" on ")[0]})\n`);
  } catch (err) {
    console.error(`GET /db failed: ${err.message}`);
    res.status(500).type("text/plain").send(`database error: ${err.message}\n`);
  } finally {
    await db.end().catch(() => {});
  }
});

app.listen(port, () => console.log(`listening on ${port}`));
