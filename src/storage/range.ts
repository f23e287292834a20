// Range reads (placeholder until the measured version lands): nextv pages + close.
import type { Space } from "./layout.js";

export interface Range {
  gt?: string;
  gte?: string;
  lt?: string;
  lte?: string;
  reverse?: boolean;
  limit?: number;
}

const PAGE = 256;

export async function readEntries(space: Space, range: Range): Promise<[string, unknown][]> {
  const it = space.iterator(range);
  const out: [string, unknown][] = [];
  try {
    for (;;) {
      const page = (await it.nextv(PAGE)) as [string, unknown][];
      if (page.length === 0) break;
      for (const e of page) out.push(e);
    }
  } finally {
    await it.close();
  }
  return out;
}

export async function readKeys(space: Space, range: Range): Promise<string[]> {
  const it = space.keys(range);
  const out: string[] = [];
  try {
    for (;;) {
      const page = (await it.nextv(PAGE)) as string[];
      if (page.length === 0) break;
      for (const k of page) out.push(k);
    }
  } finally {
    await it.close();
  }
  return out;
}

export async function readValues(space: Space, range: Range): Promise<unknown[]> {
  const it = space.values(range);
  const out: unknown[] = [];
  try {
    for (;;) {
      const page = (await it.nextv(PAGE)) as unknown[];
      if (page.length === 0) break;
      for (const v of page) out.push(v);
    }
  } finally {
    await it.close();
  }
  return out;
}
