#!/usr/bin/env node
// Stand-alone entry point of the chat client: `node dist/src/cli/chat-main.js [options]`.

import { chatCommand } from "./chat.js";

const code = await chatCommand(process.argv.slice(2));
// Exit only once stdout has taken everything: on a pipe, process.exit() right after a
// write can cut the last lines off.
process.stdout.write("", () => process.exit(code));
