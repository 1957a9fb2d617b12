// Flynn's Node.js example: answers GET / on $PORT.
const express = require("express");

const app = express();
const port = process.env.PORT || 5000;

app.get("/", (req, res) => {
  res.type("text/plain").send(`Hello from Node.js ${process.version} on Flynn!\n`);
});

app.listen(port, () => console.log(`listening on ${port}`));
