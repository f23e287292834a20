// Byte-level splitter for the server's output: one JSON object per line, each ended
// by a single "\n" (PROTOCOL.md §2, "Server → client"). TCP delivers arbitrary
// slices, so a frame may arrive in many chunks, several frames may share one, and a
// chunk boundary may fall inside a multi-byte UTF-8 character. Splitting on the 0x0A
// byte before decoding is safe because UTF-8 never uses that byte inside a multi-byte
// sequence, and decoding whole lines means a split character is never mangled.

export class LineTooLongError extends Error {
  constructor(readonly limit: number) {
    super(`a frame from the server is longer than ${limit} bytes`);
  }
}

export class NdjsonSplitter {
  // Pieces of the unfinished line. Kept as a list and joined once the newline comes,
  // so a line of tens of MB (an attachment) costs linear time, not quadratic.
  private parts: Buffer[] = [];
  private partBytes = 0;

  /** `maxLineBytes` bounds what one unterminated line may make us buffer. */
  constructor(private readonly maxLineBytes = Number.POSITIVE_INFINITY) {}

  /** Feeds a chunk; returns the complete lines it finished, without their "\n". */
  push(chunk: Buffer): string[] {
    const lines: string[] = [];
    for (const line of this.pushBytes(chunk)) {
      // Tolerate "\r\n" and blank lines: a proxy or a test double may add them.
      let end = line.length;
      if (end > 0 && line[end - 1] === 0x0d) end--;
      if (end > 0) lines.push(line.toString("utf8", 0, end));
    }
    return lines;
  }

  /**
   * The same, as bytes (views into `chunk` where a line sits inside it): for readers
   * that look at a frame's first bytes before deciding to decode it (the benchmarks).
   */
  pushBytes(chunk: Buffer): Buffer[] {
    const lines: Buffer[] = [];
    let from = 0;
    for (;;) {
      const nl = chunk.indexOf(0x0a, from);
      if (nl < 0) break;
      const piece = chunk.subarray(from, nl);
      let line: Buffer;
      if (this.parts.length === 0) line = piece;
      else {
        this.parts.push(piece);
        line = Buffer.concat(this.parts, this.partBytes + piece.length);
        this.parts = [];
        this.partBytes = 0;
      }
      if (line.length > this.maxLineBytes) throw new LineTooLongError(this.maxLineBytes);
      from = nl + 1;
      lines.push(line);
    }
    if (from < chunk.length) {
      // Copy the tail: the socket may reuse its buffer, and keeping a view would pin
      // the whole chunk in memory for a few trailing bytes.
      const rest = Buffer.from(chunk.subarray(from));
      this.parts.push(rest);
      this.partBytes += rest.length;
      if (this.partBytes > this.maxLineBytes) throw new LineTooLongError(this.maxLineBytes);
    }
    return lines;
  }

  /** Bytes of an unfinished line held right now. */
  get buffered(): number {
    return this.partBytes;
  }

  reset(): void {
    this.parts = [];
    this.partBytes = 0;
  }
}
