//! Brings up `lo` in a fresh network namespace with one rtnetlink request, the only network a
//! container gets (what `ip link set lo up` sends; no other interface exists to reach).

use std::os::fd::AsRawFd;

use nix::sys::socket::{
    AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType, recv, sendto, socket,
};

/// `lo` is always interface 1 in a new namespace (the kernel's `LOOPBACK_IFINDEX`).
const LOOPBACK_IFINDEX: i32 = 1;
const RTM_NEWLINK: u16 = 16;
const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const IFF_UP: u32 = 1;

/// Sets `lo` up; the kernel's answer (an ack or an errno) is checked.
pub fn bring_up() -> Result<(), String> {
    let fd = socket(
        AddressFamily::Netlink,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkRoute,
    )
    .map_err(|e| format!("netlink socket: {e}"))?;
    let mut msg = Vec::with_capacity(32);
    // struct nlmsghdr
    msg.extend_from_slice(&32u32.to_ne_bytes());
    msg.extend_from_slice(&RTM_NEWLINK.to_ne_bytes());
    msg.extend_from_slice(&(NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
    msg.extend_from_slice(&1u32.to_ne_bytes()); // seq
    msg.extend_from_slice(&0u32.to_ne_bytes()); // pid: the kernel
    // struct ifinfomsg
    msg.extend_from_slice(&[0u8, 0u8]); // family AF_UNSPEC, pad
    msg.extend_from_slice(&0u16.to_ne_bytes()); // type
    msg.extend_from_slice(&LOOPBACK_IFINDEX.to_ne_bytes());
    msg.extend_from_slice(&IFF_UP.to_ne_bytes()); // flags
    msg.extend_from_slice(&IFF_UP.to_ne_bytes()); // change mask
    sendto(
        fd.as_raw_fd(),
        &msg,
        &NetlinkAddr::new(0, 0),
        MsgFlags::empty(),
    )
    .map_err(|e| format!("netlink send: {e}"))?;
    let mut ack = [0u8; 128];
    let n = recv(fd.as_raw_fd(), &mut ack, MsgFlags::empty())
        .map_err(|e| format!("netlink recv: {e}"))?;
    // nlmsghdr (16 bytes) then, for NLMSG_ERROR, an i32 errno (0 is the ack).
    if n < 20 || u16::from_ne_bytes([ack[4], ack[5]]) != NLMSG_ERROR {
        return Err("netlink: no ack for RTM_NEWLINK".into());
    }
    match i32::from_ne_bytes([ack[16], ack[17], ack[18], ack[19]]) {
        0 => Ok(()),
        e => Err(format!(
            "cannot bring up lo: {}",
            nix::errno::Errno::from_raw(-e)
        )),
    }
}
