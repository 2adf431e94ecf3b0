// Image preparation the way the server's preprocessing does it (serve/preprocess.py): transparency over white,
// conversion to grayscale with Pillow's weights, and Pillow's antialiased bilinear resize. Pixels are
// {width, height, channels, data: Float32Array of 0..255 values, row-major, channels last}.

/** The pixels of an image, bitmap or canvas composited over `background` (CSS colour). */
export function pixelsOf(source, width, height, background = "#fff") {
  const canvas = document.createElement("canvas");
  Object.assign(canvas, { width, height });
  const ctx = canvas.getContext("2d", { willReadFrequently: true });
  ctx.fillStyle = background;
  ctx.fillRect(0, 0, width, height);
  ctx.drawImage(source, 0, 0, width, height);
  const rgba = ctx.getImageData(0, 0, width, height).data;
  const data = new Float32Array(width * height * 3);
  for (let i = 0, j = 0; i < rgba.length; i += 4, j += 3) {
    data[j] = rgba[i]; data[j + 1] = rgba[i + 1]; data[j + 2] = rgba[i + 2];
  }
  return { width, height, channels: 3, data };
}

/** Pillow's "L" conversion (ITU-R 601-2 luma, fixed point as Pillow rounds it) when channels is 1. */
export function toChannels(px, channels) {
  if (channels === px.channels) return px;
  const n = px.width * px.height;
  const data = new Float32Array(n);
  for (let i = 0; i < n; i++) {
    const [r, g, b] = [px.data[3 * i], px.data[3 * i + 1], px.data[3 * i + 2]];
    data[i] = (r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16;
  }
  return { ...px, channels: 1, data };
}

// One axis of Pillow's resample: a triangle filter widened by the reduction factor (antialiasing).
function weights(inSize, outSize) {
  const scale = inSize / outSize;
  const support = Math.max(scale, 1);
  const out = [];
  for (let i = 0; i < outSize; i++) {
    const center = (i + 0.5) * scale;
    const lo = Math.max(Math.floor(center - support + 0.5), 0);
    const hi = Math.min(Math.floor(center + support + 0.5), inSize);
    const w = [];
    for (let x = lo; x < hi; x++) w.push(Math.max(0, 1 - Math.abs((x - center + 0.5) / support)));
    const sum = w.reduce((a, b) => a + b, 0) || 1;
    out.push({ lo, w: w.map((v) => v / sum) });
  }
  return out;
}

/** Resize to width x height as Pillow's Image.resize(..., BILINEAR) does. */
export function resize(px, width, height) {
  if (px.width === width && px.height === height) return px;
  const c = px.channels;
  const wx = weights(px.width, width);
  const tmp = new Float32Array(width * px.height * c);
  for (let y = 0; y < px.height; y++) {
    wx.forEach(({ lo, w }, x) => {
      for (let k = 0; k < c; k++) {
        let s = 0;
        w.forEach((wi, t) => { s += wi * px.data[(y * px.width + lo + t) * c + k]; });
        tmp[(y * width + x) * c + k] = s;
      }
    });
  }
  const wy = weights(px.height, height);
  const data = new Float32Array(width * height * c);
  wy.forEach(({ lo, w }, y) => {
    for (let x = 0; x < width; x++) {
      for (let k = 0; k < c; k++) {
        let s = 0;
        w.forEach((wi, t) => { s += wi * tmp[((lo + t) * width + x) * c + k]; });
        data[(y * width + x) * c + k] = Math.min(255, Math.max(0, Math.round(s)));
      }
    }
  });
  return { width, height, channels: c, data };
}

/** Paint pixels on `canvas` (resized to them; CSS enlarges it without smoothing). */
export function paint(canvas, px) {
  Object.assign(canvas, { width: px.width, height: px.height });
  const ctx = canvas.getContext("2d");
  const image = ctx.createImageData(px.width, px.height);
  for (let i = 0; i < px.width * px.height; i++) {
    for (let k = 0; k < 3; k++) image.data[4 * i + k] = px.data[i * px.channels + (px.channels === 1 ? 0 : k)];
    image.data[4 * i + 3] = 255;
  }
  ctx.putImageData(image, 0, 0);
}

/** The bounding square (with a margin) of the pixels brighter than the background in a drawing, or null. */
export function inkBox(canvas, margin) {
  const { width, height } = canvas;
  const data = canvas.getContext("2d", { willReadFrequently: true }).getImageData(0, 0, width, height).data;
  let [x0, y0, x1, y1] = [width, height, -1, -1];
  for (let y = 0; y < height; y++) {
    for (let x = 0; x < width; x++) {
      if (data[(y * width + x) * 4] > 32) {
        x0 = Math.min(x0, x); x1 = Math.max(x1, x); y0 = Math.min(y0, y); y1 = Math.max(y1, y);
      }
    }
  }
  if (x1 < 0) return null;
  const side = Math.max(x1 - x0, y1 - y0) * (1 + 2 * margin) + 1;
  return { x: (x0 + x1) / 2 - side / 2, y: (y0 + y1) / 2 - side / 2, side };
}
