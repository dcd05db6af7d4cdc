// Run a tfjs graph model in its own runtime (@tensorflow/tfjs, pure-JS CPU backend) on given inputs.
//
// usage: node run_tfjs.mjs MODEL_JSON INPUT_F32 SHAPE OUTPUT_F32
//   MODEL_JSON  the fetched model.json (its .bin files sit next to it)
//   INPUT_F32   raw little-endian float32 tensor, NHWC, of shape SHAPE (comma-separated, e.g. 8,112,112,3)
//   OUTPUT_F32  where the model's (single) output is written, raw float32
// Prints {"shape": [...]} of the output on stdout. Used by tests/test_tfjs_ports.py.
import { readFileSync, writeFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import * as tf from '@tensorflow/tfjs';

const [modelJson, inputPath, shapeArg, outputPath] = process.argv.slice(2);
if (!outputPath) {
  console.error('usage: node run_tfjs.mjs MODEL_JSON INPUT_F32 SHAPE OUTPUT_F32');
  process.exit(2);
}

await tf.setBackend('cpu');
const spec = JSON.parse(readFileSync(modelJson, 'utf8'));
const weightSpecs = spec.weightsManifest.flatMap((g) => g.weights);
const bins = spec.weightsManifest.flatMap((g) => g.paths.map((p) => readFileSync(join(dirname(modelJson), p))));
const all = Buffer.concat(bins);
const weightData = all.buffer.slice(all.byteOffset, all.byteOffset + all.byteLength);
const handler = {   // tfjs reads the same artifacts it would fetch over http: topology, specs, concatenated .bin
  load: async () => ({
    modelTopology: spec.modelTopology, weightSpecs, weightData, format: spec.format,
    generatedBy: spec.generatedBy, convertedBy: spec.convertedBy,
    signature: spec.signature, userDefinedMetadata: spec.userDefinedMetadata,
  }),
};
const model = await tf.loadGraphModel(handler);

const shape = shapeArg.split(',').map(Number);
const raw = readFileSync(inputPath);
const values = new Float32Array(raw.buffer.slice(raw.byteOffset, raw.byteOffset + raw.byteLength));
const x = tf.tensor(values, shape, 'float32');
const y = model.execute(x);
const out = Array.isArray(y) ? y[0] : y;
const data = await out.data();
writeFileSync(outputPath, Buffer.from(data.buffer, data.byteOffset, data.byteLength));
process.stdout.write(JSON.stringify({ shape: out.shape, backend: tf.getBackend(), version: tf.version.tfjs }) + '\n');
