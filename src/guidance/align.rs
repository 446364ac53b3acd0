//! Algorithm 4 (Eq. 8–9): fitting a similarity transform T_θ between two masks. (in progress)
