// The BullMQ baseline of `sluice bench jobs` (run by ops/benchmarks/bullmq_queue.py).
//
//   node bench.mjs worker  --port P --queue Q --jobs N [--latency]
//   node bench.mjs produce --port P --queue Q --jobs N --batch 1000 --in-flight 4
//   node bench.mjs latency --port P --queue Q --jobs N
//
// worker: one Worker, a no-op processor, concurrency 100; prints {"ready": true} once
// connected and, after N jobs completed, {"done": N, "last_completed_ms": …} (with
// --latency, the submit-to-start times of those jobs: the processor's start minus the
// job's timestamp, which the producer sets when it creates the job).
// produce: N jobs with addBulk, `batch` a call, `in-flight` calls at a time, every job
// with removeOnComplete; prints {"first_submit_ms": …, "submitted_ms": …}.
// latency: N jobs one at a time, each added once the one before it finished.
import { Queue, QueueEvents, Worker } from "bullmq";

function options(argv) {
  const opts = { mode: argv[2], batch: 1000, inFlight: 4, latency: false };
  for (let i = 3; i < argv.length; i++) {
    const name = argv[i].replace(/^--/, "");
    if (name === "latency") opts.latency = true;
    else if (name === "in-flight") opts.inFlight = Number(argv[++i]);
    else opts[name] = name === "queue" ? argv[++i] : Number(argv[++i]);
  }
  if (!opts.port || !opts.queue || !opts.jobs) {
    throw new Error("usage: bench.mjs worker|produce|latency --port P --queue Q --jobs N");
  }
  return opts;
}

const say = (obj) => process.stdout.write(JSON.stringify(obj) + "\n");

async function worker(opts, connection) {
  let done = 0;
  const waits = [];
  let finish;
  const finished = new Promise((resolve) => (finish = resolve));
  const w = new Worker(
    opts.queue,
    async (job) => {
      if (opts.latency) waits.push(Date.now() - job.timestamp);
    },
    { connection, concurrency: 100, autorun: false },
  );
  w.on("completed", () => {
    done += 1;
    if (done === opts.jobs) finish(Date.now());
  });
  w.on("failed", (job, err) => say({ failed: job && job.id, error: String(err) }));
  await w.waitUntilReady();
  w.run();
  say({ ready: true });
  const last = await finished;
  say({ done, last_completed_ms: last, waits_ms: opts.latency ? waits : undefined });
  await w.close();
}

async function produce(opts, connection) {
  const queue = new Queue(opts.queue, { connection });
  await queue.waitUntilReady();
  const bodies = [];
  for (let start = 0; start < opts.jobs; start += opts.batch) {
    const jobs = [];
    for (let n = start; n < Math.min(start + opts.batch, opts.jobs); n++) {
      jobs.push({ name: "noop", data: { n }, opts: { removeOnComplete: true } });
    }
    bodies.push(jobs);
  }
  const first = Date.now();
  let next = 0;
  const lane = async () => {
    while (next < bodies.length) await queue.addBulk(bodies[next++]);
  };
  await Promise.all(Array.from({ length: opts.inFlight }, lane));
  say({ first_submit_ms: first, submitted_ms: Date.now() });
  await queue.close();
}

async function latency(opts, connection) {
  const queue = new Queue(opts.queue, { connection });
  const events = new QueueEvents(opts.queue, { connection });
  await Promise.all([queue.waitUntilReady(), events.waitUntilReady()]);
  const waiting = new Map();
  events.on("completed", ({ jobId }) => waiting.get(jobId)?.());
  for (let n = 0; n < opts.jobs; n++) {
    const jobId = `latency-${n}`;
    const finished = new Promise((resolve) => waiting.set(jobId, resolve));
    await queue.add("noop", { n }, { jobId, removeOnComplete: true });
    await finished;
    waiting.delete(jobId);
  }
  say({ submitted: opts.jobs });
  await Promise.all([queue.close(), events.close()]);
}

const opts = options(process.argv);
const connection = { host: "127.0.0.1", port: opts.port, maxRetriesPerRequest: null };
const modes = { worker, produce, latency };
if (!modes[opts.mode]) throw new Error(`unknown mode ${opts.mode}`);
await modes[opts.mode](opts, connection);
process.exit(0);
