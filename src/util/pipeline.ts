/**
 * Ordered bounded-concurrency mapping: run `fn` on up to `concurrency` items at once and yield the
 * results in input order. Memory is bounded by `concurrency` results in flight.
 */
export async function* orderedMap<T, R>(
  items: AsyncIterable<T> | Iterable<T>,
  concurrency: number,
  fn: (item: T) => Promise<R>,
): AsyncGenerator<R> {
  const queue: Promise<R>[] = [];
  try {
    for await (const item of items) {
      const p = fn(item);
      p.catch(() => undefined); // surfaced when awaited in order
      queue.push(p);
      if (queue.length >= concurrency) yield await queue.shift()!;
    }
    while (queue.length > 0) yield await queue.shift()!;
  } finally {
    // Let in-flight work settle before the caller tears down what it uses.
    await Promise.allSettled(queue);
  }
}
