//! A procedural world with ground truth: solid-coloured shapes in textured scenes, captioned
//! "a {colour} {shape} {scene}", each with its object mask; plus held-out *subjects* — objects
//! with patterns that never occur in training, each of a shape class the captions use — that can
//! be rendered in any scene. The renders of a subject are the ground truth that the world
//! benchmark scores generated images against ([`score`]); the small model that `make demo` uses
//! is trained on this world by [`train`].
//!
//! Everything is a pure function of a seed: [`sample`] (the training distribution) and
//! [`render`] (one object, one scene, one placement) draw from a ChaCha8 stream, whose output is
//! value-stable across platforms and crate versions (the `rand` distributions are not, so the
//! floats are made here: the top 53 bits of a `u64`). Images are 64×64 RGB, rendered at 2×2
//! supersampling and box-averaged; the mask is the object's coverage of each pixel.

pub mod classify;
pub mod dataset;
pub mod encoders;
pub mod score;
pub mod train;

use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Image side in pixels.
pub const SIZE: usize = 64;
/// Supersampling factor per axis.
const SS: usize = 2;

/// The shape classes (the class nouns of the captions).
pub const SHAPES: [&str; 5] = ["ball", "cube", "pyramid", "ring", "star"];
/// The training colours: name and sRGB.
pub const COLOURS: [(&str, [u8; 3]); 8] = [
    ("red", [215, 35, 35]),
    ("orange", [245, 135, 25]),
    ("yellow", [240, 215, 35]),
    ("green", [45, 165, 55]),
    ("blue", [35, 75, 215]),
    ("purple", [135, 55, 185]),
    ("pink", [245, 125, 185]),
    ("white", [240, 240, 240]),
];
/// The scenes: name and caption phrase.
pub const SCENES: [(&str, &str); 8] = [
    ("grass", "on the grass"),
    ("beach", "on the beach"),
    ("sky", "in the sky"),
    ("snow", "in the snow"),
    ("floor", "on a wooden floor"),
    ("brick", "in front of a brick wall"),
    ("water", "on the water"),
    ("night", "at night"),
];

/// A deterministic stream of uniforms in [0, 1).
pub struct Rng(ChaCha8Rng);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(ChaCha8Rng::seed_from_u64(seed))
    }
    /// A stream for item `index` of stream `seed` (independent of how many items came before).
    pub fn for_item(seed: u64, stream: u64, index: u64) -> Self {
        let mut r = ChaCha8Rng::seed_from_u64(seed);
        r.set_stream(stream);
        r.set_word_pos(index as u128 * 1024 * 16);
        Self(r)
    }
    pub fn uniform(&mut self) -> f32 {
        ((self.0.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)) as f32
    }
    pub fn range(&mut self, lo: f32, hi: f32) -> f32 {
        lo + (hi - lo) * self.uniform()
    }
    pub fn below(&mut self, n: usize) -> usize {
        ((self.uniform() * n as f32) as usize).min(n - 1)
    }
}

/// How an object is coloured: one training colour, a held-out named pattern, a procedural
/// pattern, or (baselines) one arbitrary colour, shaded or flat.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Paint {
    Solid(usize),
    Pattern(Pattern),
    Procedural(Procedural),
    /// One colour, shaded like any paint (the "right shape in one colour" baseline).
    Rgb([u8; 3]),
    /// One colour, unshaded (the "flat blob" baseline).
    Flat([u8; 3]),
}

/// The five named patterns of the first held-out subjects (never in training).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pattern {
    /// Blue/yellow quarters with a red band.
    Quarters,
    /// Green and white vertical stripes.
    Stripes,
    /// Pink with dark-blue polka dots.
    Dots,
    /// Red and white checks around the ring.
    Checks,
    /// Left half orange, right half purple, a yellow centre.
    TwoTone,
}

/// The families of procedural patterns (the encoders' training objects and the later
/// held-out subjects).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Family {
    /// Two halves split by a line through the centre.
    Halves,
    /// Four quadrants, alternating.
    Quarters,
    /// Parallel stripes of width `period`.
    Stripes,
    /// One band of width `period` through the centre, on the first colour.
    Bands,
    /// Dots of the second colour on a square grid of `period`.
    Dots,
    /// A checkerboard of `period`.
    Checks,
    /// Concentric rings of width `period`.
    Rings,
}

impl Family {
    pub const ALL: [Family; 7] =
        [Family::Halves, Family::Quarters, Family::Stripes, Family::Bands, Family::Dots, Family::Checks, Family::Rings];
    /// The caption word ("a striped ball").
    pub fn adjective(self) -> &'static str {
        match self {
            Family::Halves => "two-tone",
            Family::Quarters => "quartered",
            Family::Stripes => "striped",
            Family::Bands => "banded",
            Family::Dots => "dotted",
            Family::Checks => "checked",
            Family::Rings => "ringed",
        }
    }
}

/// The colours of procedural patterns: the training colours, then four more.
pub const PALETTE: [(&str, [u8; 3]); 12] = [
    COLOURS[0],
    COLOURS[1],
    COLOURS[2],
    COLOURS[3],
    COLOURS[4],
    COLOURS[5],
    COLOURS[6],
    COLOURS[7],
    ("teal", [20, 150, 150]),
    ("brown", [120, 70, 30]),
    ("navy", [25, 30, 110]),
    ("grey", [128, 128, 128]),
];

/// A procedural pattern: a family, two colours of [`PALETTE`], the pattern's own orientation
/// (radians) and its period (stripe, band, check, ring width or dot spacing, in units of the
/// object's radius).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Procedural {
    pub family: Family,
    pub colours: [usize; 2],
    pub angle: f32,
    pub period: f32,
}

impl Procedural {
    /// The (family, unordered colour pair) that identifies a pattern to a person: two instances
    /// with the same key differ only in orientation and period.
    pub fn key(&self) -> (Family, usize, usize) {
        let [a, b] = self.colours;
        (self.family, a.min(b), a.max(b))
    }

    /// The base colour at pattern coordinates (u, v) (units of the radius).
    fn colour(&self, u: f32, v: f32) -> [f32; 3] {
        let (c, s) = (self.angle.cos(), self.angle.sin());
        let (a, b) = (c * u + s * v, -s * u + c * v);
        let p = self.period;
        let cell = |x: f32| ((x + 8.0) / p).floor() as i64;
        let second = match self.family {
            Family::Halves => a >= 0.0,
            Family::Quarters => (a < 0.0) != (b < 0.0),
            Family::Stripes => cell(a) % 2 == 1,
            Family::Bands => b.abs() < 0.5 * p,
            Family::Dots => {
                let (fa, fb) = (((a + 8.0) / p).fract() - 0.5, ((b + 8.0) / p).fract() - 0.5);
                fa * fa + fb * fb < 0.09
            }
            Family::Checks => (cell(a) + cell(b)) % 2 == 1,
            Family::Rings => ((a * a + b * b).sqrt() / p).floor() as i64 % 2 == 1,
        };
        rgb(PALETTE[self.colours[usize::from(second)]].1)
    }
}

/// One object: shape index into [`SHAPES`] and its paint.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Object {
    pub shape: usize,
    pub paint: Paint,
}

impl Object {
    /// The (family, colour pair) of a patterned object, as [`Procedural::key`]; the named
    /// patterns map to the family they belong to, with their nearest palette colours.
    pub fn pattern_key(&self) -> Option<(Family, usize, usize)> {
        let named = |f, a: usize, b: usize| Some((f, a.min(b), a.max(b)));
        match self.paint {
            Paint::Procedural(p) => Some(p.key()),
            Paint::Pattern(Pattern::Quarters) => named(Family::Quarters, 4, 2),
            Paint::Pattern(Pattern::Stripes) => named(Family::Stripes, 3, 7),
            Paint::Pattern(Pattern::Dots) => named(Family::Dots, 6, 10),
            Paint::Pattern(Pattern::Checks) => named(Family::Checks, 0, 7),
            Paint::Pattern(Pattern::TwoTone) => named(Family::Halves, 1, 5),
            _ => None,
        }
    }
}

/// A held-out subject: a name (its folder), the object, and a description.
#[derive(Debug, Clone, Copy)]
pub struct Subject {
    pub name: &'static str,
    pub object: Object,
    pub description: &'static str,
}

const fn procedural(shape: usize, family: Family, colours: [usize; 2], angle: f32, period: f32) -> Object {
    Object { shape, paint: Paint::Procedural(Procedural { family, colours, angle, period }) }
}

/// How many of [`SUBJECTS`] (the first ones) are for choosing settings; the rest are the test
/// subjects that the reported tables use.
pub const N_VALIDATION: usize = 5;

/// The held-out subjects: 5 for choosing settings (one per shape class, the named patterns),
/// then 10 test subjects (two per shape class, procedural patterns). No encoder or model
/// trained here sees their (pattern family, colour pair) ([`Object::pattern_key`]).
pub const SUBJECTS: [Subject; 15] = [
    Subject {
        name: "quartered_ball",
        object: Object { shape: 0, paint: Paint::Pattern(Pattern::Quarters) },
        description: "a ball in blue and yellow quarters with a red band",
    },
    Subject {
        name: "striped_cube",
        object: Object { shape: 1, paint: Paint::Pattern(Pattern::Stripes) },
        description: "a cube with green and white stripes",
    },
    Subject {
        name: "dotted_pyramid",
        object: Object { shape: 2, paint: Paint::Pattern(Pattern::Dots) },
        description: "a pink pyramid with dark-blue dots",
    },
    Subject {
        name: "checked_ring",
        object: Object { shape: 3, paint: Paint::Pattern(Pattern::Checks) },
        description: "a ring of red and white checks",
    },
    Subject {
        name: "two_tone_star",
        object: Object { shape: 4, paint: Paint::Pattern(Pattern::TwoTone) },
        description: "a star, half orange and half purple, with a yellow centre",
    },
    Subject {
        name: "banded_ball",
        object: procedural(0, Family::Bands, [8, 1], 0.5, 0.45),
        description: "a teal ball with a wide orange band",
    },
    Subject {
        name: "ringed_ball",
        object: procedural(0, Family::Rings, [7, 10], 0.0, 0.3),
        description: "a ball of white and navy rings",
    },
    Subject {
        name: "two_tone_cube",
        object: procedural(1, Family::Halves, [0, 8], 0.3, 1.0),
        description: "a cube, half red and half teal",
    },
    Subject {
        name: "checked_cube",
        object: procedural(1, Family::Checks, [2, 10], 0.2, 0.45),
        description: "a cube of yellow and navy checks",
    },
    Subject {
        name: "striped_pyramid",
        object: procedural(2, Family::Stripes, [4, 1], 1.2, 0.3),
        description: "a pyramid with blue and orange stripes",
    },
    Subject {
        name: "quartered_pyramid",
        object: procedural(2, Family::Quarters, [5, 3], 0.4, 1.0),
        description: "a pyramid in purple and green quarters",
    },
    Subject {
        name: "dotted_ring",
        object: procedural(3, Family::Dots, [2, 5], 0.3, 0.3),
        description: "a yellow ring with purple dots",
    },
    Subject {
        name: "two_tone_ring",
        object: procedural(3, Family::Halves, [4, 6], 0.8, 1.0),
        description: "a ring, half blue and half pink",
    },
    Subject {
        name: "ringed_star",
        object: procedural(4, Family::Rings, [0, 2], 0.0, 0.3),
        description: "a star of red and yellow rings",
    },
    Subject {
        name: "striped_star",
        object: procedural(4, Family::Stripes, [7, 9], 0.7, 0.3),
        description: "a star with white and brown stripes",
    },
];

/// Whether an object's pattern is a held-out subject's (family and colour pair): such objects
/// never occur in any training data here.
pub fn held_out_pattern(o: &Object) -> bool {
    match o.pattern_key() {
        Some(k) => SUBJECTS.iter().any(|s| s.object.pattern_key() == Some(k)),
        None => false,
    }
}

/// Where the object sits: centre and radius in pixels.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Placement {
    pub cx: f32,
    pub cy: f32,
    pub r: f32,
    /// In-plane rotation of the object and its pattern (radians, clockwise on screen).
    pub angle: f32,
}

impl Placement {
    /// A random placement that keeps the object inside the image.
    pub fn draw(rng: &mut Rng) -> Self {
        let r = rng.range(11.0, 20.0);
        let m = r + 2.0;
        Self { cx: rng.range(m, SIZE as f32 - m), cy: rng.range(m, SIZE as f32 - m), r, angle: 0.0 }
    }
    /// Centred, radius 16 (the subjects' portraits and ground truth).
    pub fn centred() -> Self {
        Self { cx: 32.0, cy: 34.0, r: 16.0, angle: 0.0 }
    }
}

/// A rendered image: (H, W, 3) RGB bytes and the (H, W) object coverage in 0..=255.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Render {
    pub rgb: Vec<u8>,
    pub mask: Vec<u8>,
}

/// One training sample: the indices of its caption and the render.
#[derive(Debug, Clone)]
pub struct Sample {
    pub colour: usize,
    pub shape: usize,
    pub scene: usize,
    pub render: Render,
}

/// "a {colour} {shape} {scene phrase}" ("an" before a vowel).
pub fn caption(colour: usize, shape: usize, scene: usize) -> String {
    let c = COLOURS[colour].0;
    let article = if c.starts_with(['a', 'e', 'i', 'o', 'u']) { "an" } else { "a" };
    format!("{article} {c} {} {}", SHAPES[shape], SCENES[scene].1)
}

/// The index of a (colour, shape, scene) combination, 0..320.
pub fn combo(colour: usize, shape: usize, scene: usize) -> usize {
    (colour * SHAPES.len() + shape) * SCENES.len() + scene
}

pub const N_COMBOS: usize = COLOURS.len() * SHAPES.len() * SCENES.len();

/// Caption combinations never shown in training (one in eight, spread so that every colour,
/// shape and scene still occurs): the measure of whether the model composes what it learnt.
pub fn held_out_combo(colour: usize, shape: usize, scene: usize) -> bool {
    (colour + 3 * shape + 5 * scene) % 8 == 1
}

/// Training sample `index` of the world with seed `seed`: a uniformly drawn non-held-out
/// caption, a random placement and background.
pub fn sample(seed: u64, index: u64) -> Sample {
    let mut rng = Rng::for_item(seed, 1, index);
    let (colour, shape, scene) = loop {
        let c = (rng.below(COLOURS.len()), rng.below(SHAPES.len()), rng.below(SCENES.len()));
        if !held_out_combo(c.0, c.1, c.2) {
            break c;
        }
    };
    let place = Placement::draw(&mut rng);
    let bg_seed = rng.0.next_u64();
    let render = render(Object { shape, paint: Paint::Solid(colour) }, scene, place, bg_seed);
    Sample { colour, shape, scene, render }
}

/// Object `index` of the encoders' training distribution ([`crate`]'s `train-encoders`): a
/// random shape with a random procedural pattern (random family, two different palette
/// colours, orientation and period), or in one case of eight a training colour; never a
/// held-out subject's pattern ([`held_out_pattern`]). Instances are told apart by their index.
pub fn training_object(seed: u64, index: u64) -> Object {
    let mut rng = Rng::for_item(seed, 3, index);
    loop {
        let shape = rng.below(SHAPES.len());
        if rng.below(8) == 0 {
            return Object { shape, paint: Paint::Solid(rng.below(COLOURS.len())) };
        }
        let family = Family::ALL[rng.below(Family::ALL.len())];
        let a = rng.below(PALETTE.len());
        let b = (a + 1 + rng.below(PALETTE.len() - 1)) % PALETTE.len();
        let angle = rng.range(0.0, std::f32::consts::PI);
        let period = rng.range(0.25, 0.6);
        let o = Object { shape, paint: Paint::Procedural(Procedural { family, colours: [a, b], angle, period }) };
        if !held_out_pattern(&o) {
            return o;
        }
    }
}

/// A random view of an object for the encoders: any scene, size (radius 9–20 px), position and
/// in-plane rotation, and a background seed.
pub fn random_view(rng: &mut Rng) -> (usize, Placement, u64) {
    let scene = rng.below(SCENES.len());
    let r = rng.range(9.0, 20.0);
    let m = r + 1.0;
    let place = Placement {
        cx: rng.range(m, SIZE as f32 - m),
        cy: rng.range(m, SIZE as f32 - m),
        r,
        angle: rng.range(-std::f32::consts::PI, std::f32::consts::PI),
    };
    (scene, place, rng.0.next_u64())
}

/// Renders `object` at `place` in `scene`; `bg_seed` draws the background's texture.
pub fn render(object: Object, scene: usize, place: Placement, bg_seed: u64) -> Render {
    let n = SIZE * SS;
    let bg = Background::new(scene, bg_seed);
    let mut acc = vec![0f32; SIZE * SIZE * 3];
    let mut cov = vec![0f32; SIZE * SIZE];
    let w = 1.0 / (SS * SS) as f32;
    for sy in 0..n {
        for sx in 0..n {
            // sample position in pixel units
            let x = (sx as f32 + 0.5) / SS as f32;
            let y = (sy as f32 + 0.5) / SS as f32;
            let mut c = bg.at(x, y);
            let (ox, oy) = ((x - place.cx) / place.r, (y - place.cy) / place.r);
            // a soft ground shadow below the object in the ground scenes
            if bg.ground {
                let (dx, dy) = (ox / 1.1, (oy - 0.95) / 0.22);
                let d = dx * dx + dy * dy;
                if d < 1.0 {
                    let k = 1.0 - 0.35 * (1.0 - d);
                    c = [c[0] * k, c[1] * k, c[2] * k];
                }
            }
            let mut inside = false;
            if let Some(col) = object_colour(object, ox, oy, place.angle) {
                c = col;
                inside = true;
            }
            let (px, py) = (sx / SS, sy / SS);
            let i = py * SIZE + px;
            for k in 0..3 {
                acc[i * 3 + k] += c[k] * w;
            }
            if inside {
                cov[i] += w;
            }
        }
    }
    let to_u8 = |v: f32| (v.clamp(0.0, 1.0) * 255.0).round() as u8;
    Render { rgb: acc.into_iter().map(to_u8).collect(), mask: cov.into_iter().map(to_u8).collect() }
}

fn rgb(c: [u8; 3]) -> [f32; 3] {
    [c[0] as f32 / 255.0, c[1] as f32 / 255.0, c[2] as f32 / 255.0]
}

fn scale(c: [f32; 3], k: f32) -> [f32; 3] {
    [c[0] * k, c[1] * k, c[2] * k]
}

fn mix(a: [f32; 3], b: [f32; 3], t: f32) -> [f32; 3] {
    [a[0] + (b[0] - a[0]) * t, a[1] + (b[1] - a[1]) * t, a[2] + (b[2] - a[2]) * t]
}

/// The shaded colour of the object at object coordinates (u, v) (units of the radius, y down),
/// or None outside it; `angle` rotates the object and its pattern in the image plane (the
/// ball's light stays where it is: a sphere turned in place).
fn object_colour(o: Object, u: f32, v: f32, angle: f32) -> Option<[f32; 3]> {
    let (ru, rv) = if angle == 0.0 {
        (u, v)
    } else {
        let (c, s) = (angle.cos(), angle.sin());
        (c * u + s * v, -s * u + c * v)
    };
    let (u_world, v_world) = (u, v);
    let (u, v) = (ru, rv);
    // (shade, pattern coordinates) per shape
    let (shade, pu, pv) = match o.shape {
        0 => {
            // ball: a sphere lit from the upper left
            let (wu, wv) = (u_world, v_world);
            let d2 = wu * wu + wv * wv;
            if d2 > 1.0 {
                return None;
            }
            if let Paint::Flat(c) = o.paint {
                return Some(rgb(c));
            }
            let z = (1.0 - d2).sqrt();
            let l = [-0.45f32, -0.6, 0.66];
            let lam = (wu * l[0] + wv * l[1] + z * l[2]).max(0.0);
            let spec = ((wu + 0.35).powi(2) + (wv + 0.45).powi(2) < 0.02) as i32 as f32;
            return Some(mix(scale(paint(o.paint, u, v), 0.35 + 0.75 * lam), [1.0; 3], 0.6 * spec));
        }
        1 => {
            // cube: an isometric hexagon, three faces (top light, left mid, right dark)
            let s = 0.866f32;
            if u.abs() > s || v.abs() > 1.0 - u.abs() / (2.0 * s) {
                return None;
            }
            if v < -0.5 * u.abs() / s {
                (1.1, u, v * 2.0 + 1.0)
            } else if u < 0.0 {
                (0.85, u, v)
            } else {
                (0.6, u, v)
            }
        }
        2 => {
            // pyramid: a triangle, apex up, left face lit, right face shaded
            let t = (v + 1.0) / 1.9; // 0 at the apex, 1 at the base
            if !(0.0..=1.0).contains(&t) || u.abs() > t {
                return None;
            }
            let k = if u < 0.15 * t { 1.0 } else { 0.65 };
            (k, u, v)
        }
        3 => {
            // ring: an annulus, shaded like a torus
            let d = (u * u + v * v).sqrt();
            if !(0.55..=1.0).contains(&d) {
                return None;
            }
            let across = (d - 0.775) / 0.225; // -1 inner edge .. 1 outer edge
            let nz = (1.0 - across * across).max(0.0).sqrt();
            let lam = (-0.5 * across * (u + v) / d.max(1e-3) * 0.7 + nz * 0.8).max(0.0);
            (0.4 + 0.7 * lam, u, v)
        }
        _ => {
            // star: five points, flat with a soft top-down gradient
            let a = v.atan2(u) + std::f32::consts::FRAC_PI_2;
            let d = (u * u + v * v).sqrt();
            let sector = std::f32::consts::TAU / 5.0;
            let f = ((a.rem_euclid(sector)) / sector - 0.5).abs() * 2.0; // 0 at a point, 1 between
            let rim = 1.0 - 0.55 * f;
            if d > rim {
                return None;
            }
            (1.05 - 0.3 * (v + 1.0) / 2.0, u, v)
        }
    };
    if let Paint::Flat(c) = o.paint {
        return Some(rgb(c));
    }
    Some(scale(paint(o.paint, pu, pv), shade))
}

/// The base colour of a paint at object coordinates (u, v) in [-1, 1]².
fn paint(p: Paint, u: f32, v: f32) -> [f32; 3] {
    match p {
        Paint::Solid(c) => rgb(COLOURS[c].1),
        Paint::Rgb(c) | Paint::Flat(c) => rgb(c),
        Paint::Procedural(q) => q.colour(u, v),
        Paint::Pattern(Pattern::Quarters) => {
            if v.abs() < 0.17 {
                rgb([215, 30, 30])
            } else if (u < 0.0) == (v < 0.0) {
                rgb([30, 70, 220])
            } else {
                rgb([245, 215, 30])
            }
        }
        Paint::Pattern(Pattern::Stripes) => {
            if ((u + 2.0) / 0.29) as i32 % 2 == 0 {
                rgb([40, 160, 60])
            } else {
                rgb([240, 240, 240])
            }
        }
        Paint::Pattern(Pattern::Dots) => {
            let (gu, gv) = ((u + 2.0) / 0.36, (v + 2.0) / 0.36);
            let (fu, fv) = (gu.fract() - 0.5, gv.fract() - 0.5);
            if fu * fu + fv * fv < 0.09 {
                rgb([25, 30, 110])
            } else {
                rgb([245, 125, 185])
            }
        }
        Paint::Pattern(Pattern::Checks) => {
            let a = v.atan2(u) + std::f32::consts::PI;
            if ((a / (std::f32::consts::TAU / 10.0)) as i32) % 2 == 0 {
                rgb([215, 35, 35])
            } else {
                rgb([245, 245, 245])
            }
        }
        Paint::Pattern(Pattern::TwoTone) => {
            if u * u + v * v < 0.09 {
                rgb([245, 220, 40])
            } else if u < 0.0 {
                rgb([245, 135, 25])
            } else {
                rgb([130, 50, 190])
            }
        }
    }
}

/// A scene's background, parameterised by a seed.
struct Background {
    scene: usize,
    /// 9×9 lattice of smooth noise values in [0, 1).
    lattice: [[f32; 9]; 9],
    seed: u64,
    /// Scene-specific parameters (horizon, moon, clouds, plank offsets, …).
    p: [f32; 8],
    /// Objects cast a shadow on the ground.
    ground: bool,
}

impl Background {
    fn new(scene: usize, seed: u64) -> Self {
        let mut rng = Rng::new(seed);
        let mut lattice = [[0f32; 9]; 9];
        for row in lattice.iter_mut() {
            for v in row.iter_mut() {
                *v = rng.uniform();
            }
        }
        let mut p = [0f32; 8];
        for v in p.iter_mut() {
            *v = rng.uniform();
        }
        let ground = matches!(SCENES[scene].0, "grass" | "beach" | "snow" | "floor");
        Self { scene, lattice, seed, p, ground }
    }

    /// Smooth noise in [0, 1) at pixel (x, y).
    fn smooth(&self, x: f32, y: f32) -> f32 {
        let (gx, gy) = (x / SIZE as f32 * 8.0, y / SIZE as f32 * 8.0);
        let (ix, iy) = ((gx as usize).min(7), (gy as usize).min(7));
        let (fx, fy) = (gx - ix as f32, gy - iy as f32);
        let l = &self.lattice;
        let a = l[iy][ix] + (l[iy][ix + 1] - l[iy][ix]) * fx;
        let b = l[iy + 1][ix] + (l[iy + 1][ix + 1] - l[iy + 1][ix]) * fx;
        a + (b - a) * fy
    }

    /// Per-texel hash noise in [0, 1) (texel = one image pixel).
    fn hash(&self, x: f32, y: f32, salt: u64) -> f32 {
        let (ix, iy) = (x as u64, y as u64);
        let mut h = self.seed ^ salt.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        h ^= ix.wrapping_mul(0xBF58_476D_1CE4_E5B9) ^ iy.wrapping_mul(0x94D0_49BB_1331_11EB);
        h = (h ^ (h >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        h = (h ^ (h >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        h ^= h >> 31;
        (h >> 40) as f32 / (1u64 << 24) as f32
    }

    fn at(&self, x: f32, y: f32) -> [f32; 3] {
        let s = SIZE as f32;
        let n = self.smooth(x, y) - 0.5;
        let h = self.hash(x, y, 1) - 0.5;
        let p = &self.p;
        match SCENES[self.scene].0 {
            "grass" => {
                let blade = self.hash(x, (y / 3.0).floor(), 2) > 0.8;
                let base = [0.25 + 0.15 * n, 0.55 + 0.2 * n, 0.18];
                let c = if blade { scale(base, 0.7) } else { base };
                [c[0] + 0.04 * h, c[1] + 0.06 * h, c[2] + 0.03 * h]
            }
            "beach" => {
                let sky = 0.25 + 0.1 * p[0];
                let sea = sky + 0.13 + 0.06 * p[1];
                if y < sky * s {
                    mix([0.5, 0.75, 0.95], [0.72, 0.86, 0.98], y / (sky * s))
                } else if y < sea * s {
                    let wave = ((x * 0.5 + y * 1.7 + p[2] * 6.0).sin() > 0.85) as i32 as f32;
                    mix([0.12, 0.45, 0.72], [0.8, 0.9, 0.95], 0.5 * wave)
                } else {
                    [0.88 + 0.06 * n + 0.04 * h, 0.78 + 0.06 * n + 0.04 * h, 0.58 + 0.05 * n + 0.04 * h]
                }
            }
            "sky" => {
                let base = mix([0.3, 0.55, 0.9], [0.68, 0.82, 0.98], y / s);
                // two clouds: unions of three discs
                let mut cloud = 0.0f32;
                for c in 0..2 {
                    let (cx, cy) = (p[2 * c] * s, (0.15 + 0.7 * p[2 * c + 1]) * s);
                    for k in 0..3 {
                        let (dx, dy) =
                            (x - cx - (k as f32 - 1.0) * 6.0, (y - cy + if k == 1 { 3.0 } else { 0.0 }) * 1.3);
                        let r = if k == 1 { 7.0 } else { 5.5 };
                        if dx * dx + dy * dy < r * r {
                            cloud = 1.0;
                        }
                    }
                }
                mix(base, [0.97, 0.97, 1.0], cloud * (0.9 + 0.1 * n))
            }
            "snow" => {
                let horizon = (0.2 + 0.15 * p[0]) * s;
                if y < horizon {
                    mix([0.62, 0.68, 0.78], [0.8, 0.84, 0.9], y / horizon)
                } else {
                    let speck = (self.hash(x, y, 3) > 0.93) as i32 as f32;
                    let c = [0.92 + 0.05 * n, 0.94 + 0.04 * n, 0.98 + 0.02 * n];
                    mix(c, [0.7, 0.75, 0.85], 0.5 * speck)
                }
            }
            "floor" => {
                let plank = ((y + p[0] * 8.0) / 8.0).floor();
                let shade = 0.85 + 0.3 * self.hash(plank, 0.0, 4);
                let gap = ((y + p[0] * 8.0) % 8.0) < 1.0;
                let grain = 0.06 * ((x * 0.35 + plank * 7.0 + 3.0 * n).sin());
                let c = scale([0.58 + grain, 0.38 + grain, 0.2 + grain * 0.5], shade);
                if gap {
                    scale(c, 0.45)
                } else {
                    c
                }
            }
            "brick" => {
                let row = ((y + p[0] * 7.0) / 7.0).floor();
                let off = if row as i64 % 2 == 0 { 0.0 } else { 7.0 };
                let col = ((x + off + p[1] * 14.0) / 14.0).floor();
                let mortar = ((y + p[0] * 7.0) % 7.0) < 1.2 || ((x + off + p[1] * 14.0) % 14.0) < 1.2;
                if mortar {
                    [0.78 + 0.05 * h, 0.76 + 0.05 * h, 0.72 + 0.05 * h]
                } else {
                    let v = 0.8 + 0.35 * self.hash(col, row, 5);
                    scale([0.66 + 0.04 * h, 0.28 + 0.03 * h, 0.2 + 0.03 * h], v)
                }
            }
            "water" => {
                let wave = (x * 0.45 + 2.5 * (y * 0.3 + p[0] * 6.0).sin() + p[1] * 6.0).sin();
                let crest = (wave > 0.8) as i32 as f32;
                let c = mix([0.06, 0.3, 0.55], [0.12, 0.45, 0.7], y / s + 0.2 * n);
                mix(c, [0.7, 0.85, 0.95], 0.55 * crest)
            }
            _ => {
                // night: a dark sky, stars, a moon
                let c = mix([0.02, 0.03, 0.1], [0.07, 0.09, 0.22], y / s);
                let (mx, my) = ((0.15 + 0.7 * p[0]) * s, (0.1 + 0.2 * p[1]) * s);
                let (dx, dy) = (x - mx, y - my);
                if dx * dx + dy * dy < 25.0 {
                    return [0.95, 0.93, 0.75];
                }
                if self.hash(x, y, 6) > 0.985 {
                    return [0.9, 0.9, 0.95];
                }
                c
            }
        }
    }
}
