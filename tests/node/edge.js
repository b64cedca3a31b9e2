// A Sparkplug B edge node with one device, on Eclipse Tahu's JavaScript client (sparkplug-client).
// Used by tests/integration/test_sparkplug.py as a client nobody on the team wrote.
//
//   node edge.js <port> <group> <edge node> <device> <data messages>
//
// Publishes NBIRTH + DBIRTH (names, aliases, datatypes), then <data messages> DDATA with aliases only,
// then one DDATA naming an alias no birth defined (the host must ask for a rebirth). Answers an NCMD
// "Node Control/Rebirth" with fresh births. Prints one JSON line per event; ends on stdin "stop" with an
// NDEATH (publishDeath), or on SIGTERM.
"use strict";
const sparkplug = require("sparkplug-client");
const readline = require("readline");

const [port, groupId, edgeNode, deviceId, count] = process.argv.slice(2);
const say = (event, extra = {}) => console.log(JSON.stringify({ event, ...extra }));
const T0 = Date.now() - 60_000;

const client = sparkplug.newClient({
  serverUrl: `tcp://127.0.0.1:${port}`,
  username: "", password: "",
  groupId, edgeNode, clientId: `tahu-${edgeNode}`,
  version: "spBv1.0", publishDeath: true,
});

const nodeMetrics = () => [
  { name: "Node/Uptime", alias: 1, type: "UInt32", value: 42, timestamp: T0 },
  { name: "Node/Firmware", alias: 2, type: "String", value: "v1.2, \"beta\"", timestamp: T0 },
];
const deviceMetrics = () => [
  { name: "Motor/Temperature", alias: 10, type: "Double", value: 60.5, timestamp: T0 },
  { name: "Motor/RPM", alias: 11, type: "Int32", value: 1500, timestamp: T0 },
  { name: "Motor/Offset", alias: 12, type: "Int8", value: -3, timestamp: T0 },
  { name: "Motor/Running", alias: 13, type: "Boolean", value: true, timestamp: T0 },
  { name: "Motor/Energy", alias: 14, type: "Int64", value: -1234567890123, timestamp: T0 },
];

let births = 0;
function publishBirths() {
  client.publishNodeBirth({ timestamp: Date.now(), metrics: nodeMetrics() });
  client.publishDeviceBirth(deviceId, { timestamp: Date.now(), metrics: deviceMetrics() });
  births += 1;
  say("births", { births });
}

client.on("birth", () => {
  publishBirths();
  if (births > 1) return;
  for (let i = 1; i <= Number(count); i++) {
    const ts = T0 + i * 100;
    client.publishDeviceData(deviceId, {
      timestamp: ts,
      metrics: [
        { alias: 10, type: "Double", value: 60.5 + i / 10, timestamp: ts },
        { alias: 11, type: "Int32", value: -i, timestamp: ts },
      ],
    });
  }
  say("data", { count: Number(count) });
  client.publishDeviceData(deviceId, {
    timestamp: T0 + 99_000,
    metrics: [{ alias: 999, type: "Double", value: 1.0, timestamp: T0 + 99_000 }],
  });
  say("unknown_alias");
});

client.on("ncmd", (payload) => {
  for (const m of payload.metrics || []) {
    if (m.name === "Node Control/Rebirth" && m.value === true) {
      say("rebirth_requested");
      publishBirths();
    }
  }
});

client.on("error", (err) => say("error", { message: String(err) }));
readline.createInterface({ input: process.stdin }).on("line", (line) => {
  if (line.trim() === "stop") {
    client.stop();  // publishes NDEATH with the birth's bdSeq, then disconnects
    say("stopped");
    setTimeout(() => process.exit(0), 200);
  }
});
process.on("SIGTERM", () => process.exit(0));
