// The vitkdl extension: the grammar and language configuration are declared in package.json;
// this starts the language server (`vitkdl lsp`, JSON-RPC over stdio) for .vkd documents.
"use strict";

const vscode = require("vscode");
const { LanguageClient, TransportKind } = require("vscode-languageclient/node");

let client;

function activate(context) {
  const [command, ...args] = vscode.workspace
    .getConfiguration("vitkdl")
    .get("server.command", ["vitkdl", "lsp"]);
  const serverOptions = { command, args, transport: TransportKind.stdio };
  const clientOptions = {
    documentSelector: [
      { scheme: "file", language: "vkd" },
      { scheme: "untitled", language: "vkd" },
    ],
  };
  client = new LanguageClient("vitkdl", "vitkdl language server", serverOptions, clientOptions);
  context.subscriptions.push(client);
  return client.start();
}

function deactivate() {
  return client ? client.stop() : undefined;
}

module.exports = { activate, deactivate };
