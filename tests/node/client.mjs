// Cross-language check: a Node.js client built from protos/ at run time (no Python involved).
// Usage: node client.mjs ADDRESS MODEL IMAGE_PATH GOOGLEAPIS_PROTO_DIR [CA_PEM (TLS)]
// Prints one JSON line: the models, the Run events, and the structured error of a bad Submit
// (code, and the google.rpc.ErrorInfo reason read from the grpc-status-details-bin trailer).
import { readFileSync } from "node:fs";
import { fileURLToPath } from "node:url";
import path from "node:path";
import grpc from "@grpc/grpc-js";
import protoLoader from "@grpc/proto-loader";
import protobuf from "protobufjs";

const [address, model, imagePath, googleProtos, caPath] = process.argv.slice(2);
const protos = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../../protos");
const definition = protoLoader.loadSync("florence2/v1/florence2.proto", {
  includeDirs: [protos, googleProtos], keepCase: true, enums: String, longs: Number, defaults: true,
});
const { Florence2Service } = grpc.loadPackageDefinition(definition).florence2.v1;
const credentials = caPath ? grpc.credentials.createSsl(readFileSync(caPath)) : grpc.credentials.createInsecure();
const client = new Florence2Service(address, credentials);
const image = readFileSync(imagePath);

const rpc = new protobuf.Root();
rpc.resolvePath = (_origin, target) => path.join(googleProtos, target);
rpc.loadSync(["google/rpc/status.proto", "google/rpc/error_details.proto"], { keepCase: true });
const Status = rpc.lookupType("google.rpc.Status");
const ErrorInfo = rpc.lookupType("google.rpc.ErrorInfo");

function reasonOf(err) {
  const [details] = err.metadata.get("grpc-status-details-bin");
  if (!details) return null;
  for (const any of Status.decode(details).details) {
    if (any.type_url.endsWith("/google.rpc.ErrorInfo")) return ErrorInfo.decode(any.value).reason;
  }
  return null;
}

function fail(message) { console.error(message); process.exit(1); }

client.ListModels({}, (err, listed) => {
  if (err) fail(err.message);
  const events = [];
  const call = client.Run({ job: { model, task: "TASK_TYPE_OD", image } });
  call.on("data", (response) => events.push(response.event));
  call.on("error", (e) => fail(e.message));
  call.on("end", () => {
    client.Submit({ job: { model: "no-such-model", task: "TASK_TYPE_OD", image } }, (bad) => {
      if (!bad) fail("a Submit to an unknown model succeeded");
      const error = { code: grpc.status[bad.code], reason: reasonOf(bad), details: bad.details };
      const models = listed.models.map((m) => ({ name: m.name, kind: m.kind, tasks: m.tasks.length }));
      console.log(JSON.stringify({ models, events, error }));
      client.close();
    });
  });
});
