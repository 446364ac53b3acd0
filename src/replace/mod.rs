//! Personalised subject replacement (paper §3.4, Algorithm 3): null-text inversion of the
//! user's photo ([`nti`]) and prompt-to-prompt attention control ([`p2p`]) that swaps one word
//! of its caption for the learned subject ([`job`]).

pub mod job;
pub mod nti;
pub mod p2p;
