#!/usr/bin/env node
// Standalone Cloud Tasks emulator: firebase-tools' own TasksEmulator class, run alone.
//
// `firebase emulators:start --only tasks` starts the Tasks emulator only together with
// the Functions emulator ("Cloud Tasks: Failed to initialize" otherwise). Tests that call
// handlers directly still need a CLOUD_TASKS_EMULATOR_HOST that answers, so that
// firebase_admin's task_queue().enqueue() never goes to Google. tools/emulators.py runs
// this script when "tasks" is asked for without "functions".
//
// Usage: node tools/tasks_emulator.js HOST PORT
"use strict";
const path = require("path");

const root = path.resolve(__dirname, "..");
const { TasksEmulator } = require(
  path.join(root, "node_modules/firebase-tools/lib/emulator/tasksEmulator.js"),
);

const [host, port] = process.argv.slice(2);
if (!host || !port) {
  console.error("usage: node tools/tasks_emulator.js HOST PORT");
  process.exit(2);
}

const emulator = new TasksEmulator({ host, port: Number(port) });
emulator
  .start()
  .then(() => console.log(`Cloud Tasks emulator (standalone) listening on ${host}:${port}`))
  .catch((err) => {
    console.error(err);
    process.exit(1);
  });

for (const sig of ["SIGINT", "SIGTERM"]) {
  process.on(sig, () => {
    emulator.stop().finally(() => process.exit(0));
  });
}
