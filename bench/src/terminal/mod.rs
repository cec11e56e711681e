//! The terminal phase: a Cronium terminal (WebSocket → control plane → QUIC → agent → PTY)
//! against `ssh -tt` to a throwaway sshd on 127.0.0.1, over its own connection ("fresh") and
//! through a ControlMaster, all driven by the same client ([`shell::Shell`]) and measured the
//! same way, interleaved round by round:
//!
//! - keystroke echo: `cat > /dev/null` runs in the shell, so the PTY's line discipline echoes what
//!   is typed; one `x` is sent and the time until it is read back is a sample;
//! - `cat` of a file of base64 lines (written by the benchmark): from typing
//!   `cat FILE; echo END-$((1+1))` until `END-2` arrived, as MiB of the file per second;
//! - Ctrl-C under a flood: `yes` runs until [`FLOOD_BYTES`] arrived, then 0x03 is sent and the
//!   time until the prompt ([`shell::PROMPT`]) arrives is a sample (everything buffered on the
//!   way has to drain first);
//! - session open: from starting to connect (the WebSocket handshake, or starting `ssh`) until
//!   the output of `echo open-$((1+1))`, typed right away, arrived.
//!
//! Every side runs the same shell: `bash --noprofile --norc` through a small wrapper
//! ([`write_shell`]), the agent's `--terminal-shell` and ssh's remote command, so the machine's
//! dotfiles (here root's `.bashrc` spends half a second in `pyenv init`) do not dominate both
//! sides of the session-open figure. The wrapper runs `stty sane` first: ssh's stdin is a pipe,
//! and through a ControlMaster the master copies the modes of that "terminal" (`tcgetattr`
//! fails, leaving them all zero: no echo, no signals) to the remote PTY; a plain `ssh -tt` and
//! the agent start from sane modes anyway.

mod shell;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use base64::Engine;
use rand::RngCore;
use serde_json::{Value, json};

use self::shell::{PROMPT, Shell};
use crate::api::Api;
use crate::progress;
use crate::report::{at_least, at_most, targets};
use crate::ssh::SshPeer;
use crate::stats::Summary;

/// Output of `yes` that must have arrived before Ctrl-C is sent (the pipeline is full by then).
pub const FLOOD_BYTES: u64 = 1024 * 1024;

/// Untimed rounds of the session-open and Ctrl-C measurements.
const WARMUP_ROUNDS: usize = 2;

/// Echo samples after which the typed line is ended (untimed), so lines stay short.
const ECHO_LINE: usize = 50;

/// Bound of every single wait of the phase.
const WAIT: Duration = Duration::from_secs(60);

/// What the phase measures and how often.
#[derive(Debug, Clone, Copy)]
pub struct TerminalOptions {
    /// Keystroke echo samples per side.
    pub echo: usize,
    /// Untimed echo samples per side before them.
    pub echo_warmup: usize,
    /// Session-open samples per side.
    pub opens: usize,
    /// Ctrl-C-under-flood samples per side.
    pub interrupts: usize,
    /// Size of the file `cat` prints, bytes.
    pub cat_bytes: u64,
    /// `cat` runs per side.
    pub cat_runs: usize,
}

/// How a side's shells are opened.
pub enum Opener<'a> {
    /// Cronium's terminal WebSocket at `url`, with a bearer `token`.
    Cronium { url: String, token: String },
    /// `ssh -tt … remote`, over its own connection or through the peer's ControlMaster.
    Ssh {
        peer: &'a SshPeer,
        multiplexed: bool,
        remote: String,
    },
}

impl Opener<'_> {
    async fn open(&self) -> anyhow::Result<Shell> {
        match self {
            Opener::Cronium { url, token } => Shell::websocket(url, token).await,
            Opener::Ssh {
                peer,
                multiplexed,
                remote,
            } => Shell::ssh(peer.terminal_command(*multiplexed, remote)),
        }
    }
}

/// One side of the comparison.
pub struct Side<'a> {
    /// How the report names it.
    pub name: &'static str,
    /// How its shells are opened.
    pub opener: Opener<'a>,
}

/// One side's samples: milliseconds, and MiB/s for `cat`.
#[derive(Default)]
struct Samples {
    echo: Vec<f64>,
    open: Vec<f64>,
    interrupt: Vec<f64>,
    cat: Vec<f64>,
}

/// One side's figures.
pub struct SideFigures {
    /// The side's name.
    pub name: String,
    /// Keystroke echo, ms.
    pub echo: Summary,
    /// Session open until the first command's output, ms.
    pub open: Summary,
    /// Ctrl-C under a flood until the prompt, ms.
    pub interrupt: Summary,
    /// `cat` throughput, MiB/s (`p50` is the median, `min` the slowest run).
    pub cat: Summary,
}

/// The phase's outcome: Cronium and, when sshd is available, both ssh variants.
pub struct TerminalFigures {
    /// What was measured.
    pub options: TerminalOptions,
    /// Cronium's terminal.
    pub cronium: SideFigures,
    /// `ssh -tt` over its own connection, and through a ControlMaster.
    pub ssh: Option<(SideFigures, SideFigures)>,
}

/// Writes the shell every side runs (`DIR/bench-shell`, mode 0755) and returns its path.
pub fn write_shell(dir: &Path) -> anyhow::Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let path = dir.join("bench-shell");
    std::fs::write(
        &path,
        "#!/bin/sh\nstty sane\nexec /bin/bash --noprofile --norc\n",
    )
    .with_context(|| format!("cannot write {}", path.display()))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))
        .with_context(|| format!("cannot make {} executable", path.display()))?;
    Ok(path)
}

/// Writes `bytes` bytes of base64 lines (76 characters and a newline) of random data to `path`.
fn write_cat_file(path: &Path, bytes: u64) -> anyhow::Result<()> {
    let file =
        std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    let mut out = std::io::BufWriter::with_capacity(1 << 20, file);
    let mut random = [0u8; 57];
    let mut line = String::with_capacity(80);
    let mut left = bytes;
    while left > 0 {
        rand::thread_rng().fill_bytes(&mut random);
        line.clear();
        base64::engine::general_purpose::STANDARD.encode_string(random, &mut line);
        line.push('\n');
        let take = (line.len() as u64).min(left) as usize;
        out.write_all(&line.as_bytes()[..take])?;
        left -= take as u64;
    }
    out.flush()
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

/// Gives a fresh shell the prompt and settings every measurement relies on.
async fn prepare(shell: &mut Shell) -> anyhow::Result<()> {
    shell
        .send(
            b"stty cols 80 rows 24; PS1='CRB''PROMPT> '; PS2=''; PROMPT_COMMAND=''; \
              unset HISTFILE; bind 'set enable-bracketed-paste off'; echo setup-$((1+1))\r",
        )
        .await?;
    shell.read_until("setup-2", WAIT).await?;
    shell.read_until(PROMPT, WAIT).await
}

fn ms(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1e3
}

/// Measures every side (see the module docs); `dir` holds the file `cat` prints.
pub async fn measure(
    sides: &[Side<'_>],
    options: TerminalOptions,
    dir: &Path,
) -> anyhow::Result<Vec<SideFigures>> {
    let cat_path = dir.join("cat.txt");
    write_cat_file(&cat_path, options.cat_bytes)?;
    let names: Vec<&str> = sides.iter().map(|side| side.name).collect();
    progress(&format!(
        "terminal: opening a shell on each side: {}",
        names.join(", ")
    ));
    let mut shells = Vec::with_capacity(sides.len());
    for side in sides {
        let mut shell = side
            .opener
            .open()
            .await
            .with_context(|| format!("{}: cannot open a shell", side.name))?;
        prepare(&mut shell)
            .await
            .with_context(|| format!("{}: the shell did not come up", side.name))?;
        shells.push(shell);
    }
    let mut samples: Vec<Samples> = sides.iter().map(|_| Samples::default()).collect();

    progress(&format!(
        "terminal: keystroke echo, {} + {} samples per side",
        options.echo_warmup, options.echo
    ));
    for (side, shell) in sides.iter().zip(&mut shells) {
        shell
            .send(b"echo catting-$((1+1)); cat > /dev/null\r")
            .await?;
        shell
            .read_until("catting-2", WAIT)
            .await
            .with_context(|| format!("{}: cat did not start", side.name))?;
    }
    for round in 0..options.echo_warmup + options.echo {
        for ((side, shell), samples) in sides.iter().zip(&mut shells).zip(&mut samples) {
            let started = Instant::now();
            shell.send(b"x").await?;
            shell
                .read_until("x", WAIT)
                .await
                .with_context(|| format!("{}: no echo", side.name))?;
            if round >= options.echo_warmup {
                samples.echo.push(ms(started));
            }
            if round % ECHO_LINE == ECHO_LINE - 1 {
                shell.send(b"\r").await?;
                shell.read_until("\n", WAIT).await?;
            }
        }
    }
    for (side, shell) in sides.iter().zip(&mut shells) {
        shell.send(&[0x03]).await?;
        shell
            .read_until(PROMPT, WAIT)
            .await
            .with_context(|| format!("{}: cat did not stop", side.name))?;
        shell.sync("echoed", WAIT).await?;
    }

    progress(&format!(
        "terminal: Ctrl-C under a `yes` flood, {WARMUP_ROUNDS} + {} samples per side",
        options.interrupts
    ));
    for round in 0..WARMUP_ROUNDS + options.interrupts {
        for ((side, shell), samples) in sides.iter().zip(&mut shells).zip(&mut samples) {
            shell.send(b"yes\r").await?;
            shell
                .discard(FLOOD_BYTES, WAIT)
                .await
                .with_context(|| format!("{}: no flood", side.name))?;
            let started = Instant::now();
            shell.send(&[0x03]).await?;
            shell
                .read_until(PROMPT, WAIT)
                .await
                .with_context(|| format!("{}: no prompt after Ctrl-C", side.name))?;
            if round >= WARMUP_ROUNDS {
                samples.interrupt.push(ms(started));
            }
            shell.sync("flooded", WAIT).await?;
        }
    }

    progress(&format!(
        "terminal: `cat` of {:.1} MiB, {} runs per side",
        options.cat_bytes as f64 / 1048576.0,
        options.cat_runs
    ));
    let command = format!("cat {}; echo END-$((1+1))\r", cat_path.display());
    for _ in 0..options.cat_runs {
        for ((side, shell), samples) in sides.iter().zip(&mut shells).zip(&mut samples) {
            let before = shell.received;
            let started = Instant::now();
            shell.send(command.as_bytes()).await?;
            shell
                .read_until("END-2", WAIT * 5)
                .await
                .with_context(|| format!("{}: cat did not finish", side.name))?;
            let seconds = started.elapsed().as_secs_f64();
            let received = shell.received - before;
            if received < options.cat_bytes {
                bail!(
                    "{}: only {received} bytes arrived for a file of {}",
                    side.name,
                    options.cat_bytes
                );
            }
            samples
                .cat
                .push(options.cat_bytes as f64 / 1048576.0 / seconds);
            shell.read_until(PROMPT, WAIT).await?;
        }
    }

    progress(&format!(
        "terminal: session open, {WARMUP_ROUNDS} + {} samples per side",
        options.opens
    ));
    for round in 0..WARMUP_ROUNDS + options.opens {
        for (side, samples) in sides.iter().zip(&mut samples) {
            let started = Instant::now();
            let mut shell = side.opener.open().await?;
            shell.send(b"echo open-$((1+1))\r").await?;
            shell
                .read_until("open-2", WAIT)
                .await
                .with_context(|| format!("{}: a new shell did not answer", side.name))?;
            if round >= WARMUP_ROUNDS {
                samples.open.push(ms(started));
            }
            shell
                .close()
                .await
                .with_context(|| format!("{}: a new shell did not end", side.name))?;
        }
    }

    for (side, shell) in sides.iter().zip(shells) {
        shell
            .close()
            .await
            .with_context(|| format!("{}: the shell did not end", side.name))?;
    }
    let _ = std::fs::remove_file(&cat_path);
    Ok(sides
        .iter()
        .zip(samples)
        .map(|(side, samples)| SideFigures {
            name: side.name.to_owned(),
            echo: Summary::of(&samples.echo),
            open: Summary::of(&samples.open),
            interrupt: Summary::of(&samples.interrupt),
            cat: Summary::of(&samples.cat),
        })
        .collect())
}

/// Runs the phase against the agent named `agent` (started with `--terminal-shell shell`) and,
/// when sshd is available, a throwaway sshd of its own in `dir/ssh`; `dir` also holds the file
/// `cat` prints. The sshd and its ControlMaster are stopped when this returns, also on errors.
pub async fn run(
    api: &Api,
    agent: &str,
    sshd_script: &Path,
    shell: &Path,
    dir: &Path,
    options: TerminalOptions,
) -> anyhow::Result<TerminalFigures> {
    let agents = api.get("/agents").await?;
    let agent_id = agents
        .as_array()
        .and_then(|agents| agents.iter().find(|each| each["name"] == agent))
        .and_then(|each| each["id"].as_str())
        .with_context(|| format!("no agent named {agent}"))?
        .to_owned();
    let url = format!(
        "{}/api/v1/agents/{agent_id}/terminal?cols=80&rows=24",
        api.base().replacen("http://", "ws://", 1)
    );
    let mut peer = SshPeer::start(sshd_script, &dir.join("ssh")).await?;
    if let Some(peer) = &mut peer {
        peer.ensure_master().await?;
    }
    let remote = format!("exec {}", shell.display());
    let mut sides = vec![Side {
        name: "cronium",
        opener: Opener::Cronium {
            url,
            token: api.token().to_owned(),
        },
    }];
    if let Some(peer) = &peer {
        sides.push(Side {
            name: "fresh `ssh -tt`",
            opener: Opener::Ssh {
                peer,
                multiplexed: false,
                remote: remote.clone(),
            },
        });
        sides.push(Side {
            name: "`ssh -tt` ControlMaster",
            opener: Opener::Ssh {
                peer,
                multiplexed: true,
                remote,
            },
        });
    }
    let mut figures = measure(&sides, options, dir).await?.into_iter();
    let cronium = figures.next().context("no figures for cronium")?;
    let ssh = match (figures.next(), figures.next()) {
        (Some(fresh), Some(master)) => Some((fresh, master)),
        _ => None,
    };
    Ok(TerminalFigures {
        options,
        cronium,
        ssh,
    })
}

/// `value` with 2 decimals below 10, else 1 (or none above 100).
fn number(value: f64) -> String {
    if value < 10.0 {
        format!("{value:.2}")
    } else if value < 100.0 {
        format!("{value:.1}")
    } else {
        format!("{value:.0}")
    }
}

impl TerminalFigures {
    /// The figures as markdown tables, with the ratios and the targets' verdicts.
    pub fn markdown(&self) -> String {
        let options = &self.options;
        let mut out = vec![
            format!(
                "| terminal | cronium p50 | cronium p99 | {} | target | verdict |",
                match &self.ssh {
                    Some((fresh, master)) => format!(
                        "{} p50 | {} p99 | {} p50 | {} p99 | ratio vs fresh p50 / p99 | ratio vs ControlMaster p50 / p99",
                        fresh.name, fresh.name, master.name, master.name
                    ),
                    None => "(no ssh peer)".to_owned(),
                }
            ),
            format!(
                "|---|---:|---:|{}---|---|",
                if self.ssh.is_some() {
                    "---:|---:|---:|---:|---:|---:|"
                } else {
                    "---|"
                }
            ),
        ];
        let ratios = |pick: fn(&SideFigures) -> &Summary| -> String {
            match &self.ssh {
                Some((fresh, master)) => {
                    let (ours, fresh, master) = (pick(&self.cronium), pick(fresh), pick(master));
                    format!(
                        "{} | {} | {} | {} | {:.3} / {:.3} | {:.3} / {:.3}",
                        number(fresh.p50),
                        number(fresh.p99),
                        number(master.p50),
                        number(master.p99),
                        ours.p50 / fresh.p50,
                        ours.p99 / fresh.p99,
                        ours.p50 / master.p50,
                        ours.p99 / master.p99
                    )
                }
                None => String::new(),
            }
        };
        let verdicts = self.verdicts();
        out.push(format!(
            "| keystroke echo, ms ({} samples) | {} | {} | {} | p50 ≤ {} ms and ≤ {}× ControlMaster | {} |",
            options.echo,
            number(self.cronium.echo.p50),
            number(self.cronium.echo.p99),
            ratios(|side| &side.echo),
            targets::TERMINAL_ECHO_P50_MS,
            targets::TERMINAL_ECHO_VS_CONTROLMASTER,
            verdicts.echo
        ));
        out.push(format!(
            "| session open → first command output, ms ({} samples) | {} | {} | {} | p50 ≤ {}× fresh ssh | {} |",
            options.opens,
            number(self.cronium.open.p50),
            number(self.cronium.open.p99),
            ratios(|side| &side.open),
            targets::TERMINAL_OPEN_VS_FRESH_SSH,
            verdicts.open
        ));
        out.push(format!(
            "| Ctrl-C under a `yes` flood → prompt, ms ({} samples) | {} | {} | {} | p99 ≤ {} ms | {} |",
            options.interrupts,
            number(self.cronium.interrupt.p50),
            number(self.cronium.interrupt.p99),
            ratios(|side| &side.interrupt),
            targets::TERMINAL_INTERRUPT_MS,
            verdicts.interrupt
        ));
        // Throughput: the "p50" column is the median run, the "p99" column the slowest.
        let cat_ratios = match &self.ssh {
            Some((fresh, master)) => format!(
                "{} | {} | {} | {} | {:.3} / {:.3} | {:.3} / {:.3}",
                number(fresh.cat.p50),
                number(fresh.cat.min),
                number(master.cat.p50),
                number(master.cat.min),
                self.cronium.cat.p50 / fresh.cat.p50,
                self.cronium.cat.min / fresh.cat.min,
                self.cronium.cat.p50 / master.cat.p50,
                self.cronium.cat.min / master.cat.min
            ),
            None => String::new(),
        };
        out.push(format!(
            "| `cat` of {:.0} MiB, MiB/s (median / slowest of {} runs) | {} | {} | {} | median ≥ {}× fresh ssh | {} |",
            options.cat_bytes as f64 / 1048576.0,
            options.cat_runs,
            number(self.cronium.cat.p50),
            number(self.cronium.cat.min),
            cat_ratios,
            targets::TERMINAL_CAT_VS_FRESH_SSH,
            verdicts.cat
        ));
        out.join("\n")
    }

    fn verdicts(&self) -> Verdicts {
        let echo_abs = format!(
            "p50 {}",
            at_most(self.cronium.echo.p50, targets::TERMINAL_ECHO_P50_MS, " ms")
        );
        let interrupt = format!(
            "p99 {}",
            at_most(
                self.cronium.interrupt.p99,
                targets::TERMINAL_INTERRUPT_MS,
                " ms"
            )
        );
        match &self.ssh {
            None => Verdicts {
                echo: format!("{echo_abs}; vs ControlMaster: no ssh peer"),
                open: "no ssh peer".to_owned(),
                interrupt,
                cat: "no ssh peer".to_owned(),
            },
            Some((fresh, master)) => Verdicts {
                echo: format!(
                    "{echo_abs}; ratio {}",
                    at_most(
                        self.cronium.echo.p50 / master.echo.p50,
                        targets::TERMINAL_ECHO_VS_CONTROLMASTER,
                        "×"
                    )
                ),
                open: format!(
                    "ratio {}",
                    at_most(
                        self.cronium.open.p50 / fresh.open.p50,
                        targets::TERMINAL_OPEN_VS_FRESH_SSH,
                        "×"
                    )
                ),
                interrupt,
                cat: format!(
                    "ratio {}",
                    at_least(
                        self.cronium.cat.p50 / fresh.cat.p50,
                        targets::TERMINAL_CAT_VS_FRESH_SSH,
                        "×"
                    )
                ),
            },
        }
    }

    /// Every number as JSON.
    pub fn json(&self) -> Value {
        let side = |figures: &SideFigures| {
            json!({
                "name": figures.name,
                "echo": figures.echo.to_json(),
                "open": figures.open.to_json(),
                "interrupt": figures.interrupt.to_json(),
                "cat_mib_per_second": {
                    "runs": figures.cat.count,
                    "median": figures.cat.p50,
                    "slowest": figures.cat.min,
                    "fastest": figures.cat.max,
                },
            })
        };
        let verdicts = self.verdicts();
        json!({
            "echo_samples": self.options.echo,
            "echo_warmup": self.options.echo_warmup,
            "open_samples": self.options.opens,
            "interrupt_samples": self.options.interrupts,
            "flood_bytes_before_ctrl_c": FLOOD_BYTES,
            "cat_bytes": self.options.cat_bytes,
            "cat_runs": self.options.cat_runs,
            "cronium": side(&self.cronium),
            "ssh_fresh": self.ssh.as_ref().map(|(fresh, _)| side(fresh)),
            "ssh_controlmaster": self.ssh.as_ref().map(|(_, master)| side(master)),
            "verdicts": {
                "echo": verdicts.echo,
                "open": verdicts.open,
                "interrupt": verdicts.interrupt,
                "cat": verdicts.cat,
            },
        })
    }
}

/// The verdict of each target, as text.
struct Verdicts {
    echo: String,
    open: String,
    interrupt: String,
    cat: String,
}
