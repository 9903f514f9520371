// Cross-language check: a Node.js client built from protos/ at run time (no Python involved).
// Usage: node client.mjs ADDRESS MODEL IMAGE_PATH  -> prints one JSON line with models and the Run events.
import { readFileSync } from "node:fs";
import { fileURLToPath } from "node:url";
import path from "node:path";
import grpc from "@grpc/grpc-js";
import protoLoader from "@grpc/proto-loader";

const [address, model, imagePath] = process.argv.slice(2);
const protos = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../../protos");
const definition = protoLoader.loadSync("florence2/v1/florence2.proto", {
  includeDirs: [protos], keepCase: true, enums: String, longs: Number, defaults: true,
});
const { Florence2Service } = grpc.loadPackageDefinition(definition).florence2.v1;
const client = new Florence2Service(address, grpc.credentials.createInsecure());

client.ListModels({}, (err, listed) => {
  if (err) { console.error(err.message); process.exit(1); }
  const events = [];
  const call = client.Run({ job: { model, task: "TASK_OD", image: readFileSync(imagePath) } });
  call.on("data", (response) => events.push(response.event));
  call.on("error", (e) => { console.error(e.message); process.exit(1); });
  call.on("end", () => {
    console.log(JSON.stringify({ models: listed.models.map((m) => m.name), events }));
    client.close();
  });
});
